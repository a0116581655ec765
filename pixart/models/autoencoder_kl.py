"""The diffusers ``AutoencoderKL`` (the SD / SDXL VAE) as MindSpore cells.

Built from a diffusers VAE folder's ``config.json``; parameter names equal the keys of its
``diffusion_pytorch_model.safetensors`` (``encoder.down_blocks.0.resnets.0.conv1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ...), so the weights load by name.

    encoder: conv_in, down blocks (resnets, then a stride-2 conv except in the last),
             mid block (resnet, single-head attention, resnet), GroupNorm, SiLU, conv_out
             -> 2 * latent channels (mean and log-variance), then quant_conv.
    decoder: post_quant_conv, conv_in, mid block, up blocks (resnets, then nearest 2x and
             a conv except in the last), GroupNorm, SiLU, conv_out.

Latents here are the VAE's own; the diffusion model's latents are
``(z - shift_factor) * scaling_factor``, and ``decode`` expects the inverse applied first.
``decode(z, tiled=True)`` decodes overlapping latent tiles and blends the seams linearly,
exactly as diffusers' ``tiled_decode``, so decoder activations never exceed one tile.

Shapes: B batch, C channels, H, W image size, h, w = H / f, W / f latent size, f the
downsampling factor 2 ** (len(block_out_channels) - 1) (8 for SD and SDXL).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from pixart.errors import ModelLoadError
from pixart.models import winograd
from pixart.models.winograd import zero_pad
from pixart.models.attention import math_attention
from pixart.runtime import host_threads, jit
from pixart.utils.hf_folder import load_folder_weights, read_folder_config

_IM2COL_BUDGET = 1 << 26   # elements of one im2col buffer (256 MiB in fp32)
# Decodes whose images times the widest channel count stay within this many elements compile
# (once a shape repeats): a compiled graph keeps every intermediate for its life, which is
# cheap at this size and would not be for large images.
COMPILED_DECODE_ELEMENTS = 1 << 22
# Larger 3x3 convs (C * H * W elements of input) take the Winograd path on CPU when they run
# eagerly. Not inside a compiled graph: there its bands unroll, every band keeps its own buffers,
# and a 512px encoder graph took 229 s to its first output instead of 129 s, and 12.4 GiB
# instead of 8.0 (for 12 s a call instead of 17).
WINOGRAD_MIN_ELEMENTS = COMPILED_DECODE_ELEMENTS
_SCORES_BUDGET = 1 << 24   # elements of one block of attention scores (64 MiB in fp32)
_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


@dataclasses.dataclass
class AutoencoderKLConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json``, with diffusers' defaults."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    act_fn: str = "silu"

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        down, up = list(self.down_block_types), list(self.up_block_types)
        if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
            raise ValueError(f"only DownEncoderBlock2D / UpDecoderBlock2D blocks, one per block_out_channels entry "
                             f"({n}), are supported; got {down} / {up}")
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn 'silu' is supported, got {self.act_fn!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels {bad}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_hf(cls, config: dict) -> "AutoencoderKLConfig":
        """From a diffusers ``config.json`` dict; keys the model does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class Conv2d(nn.Cell):
    """2D convolution with torch's parameter layout: weight (O, C, k, k), bias (O,).

    (B, C, H, W) -> (B, O, H', W'). With ``im2col`` (the CPU path) it runs as im2col
    (``ops.unfold``) plus a matmul, in bands of output rows that bound the im2col buffer:
    MindSpore's CPU convolution kernel takes a plain-layout oneDNN path that is about 100x
    slower than that matmul. Large 3x3 same-size convs on that path take Winograd F(4x4, 3x3)
    instead (``pixart.models.winograd``), 2-3x faster again. Otherwise it calls ``ops.conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dtype=ms.float32):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = Parameter(initializer("zeros", (out_channels, in_channels, kernel_size, kernel_size), dtype),
                                name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), dtype), name="bias")
        self.im2col = True  # AutoencoderKL sets the path of all its convs from its ``conv`` option

    def construct(self, x):
        b, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        out_channels = self.weight.shape[0]
        if not self.im2col:
            return ops.conv2d(x, self.weight, self.bias, stride=s, pad_mode="pad", padding=p)
        if c * h * w > WINOGRAD_MIN_ELEMENTS and winograd.applies(x.shape, k, s, p) and not winograd.in_compiled_graph():
            return winograd.winograd_conv3x3(x, self.weight, self.bias)
        weight = self.weight.reshape(out_channels, c * k * k)
        bias = self.bias.reshape(1, out_channels, 1)
        if k == 1 and s == 1 and p == 0:
            return (_weight_matmul(weight, x.reshape(b, c, h * w)) + bias).reshape(b, out_channels, h, w)
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        rows = max(1, min(ho, _IM2COL_BUDGET // (b * c * k * k * wo)))
        if rows == ho:  # one band: im2col pads, no slice or concat (copies of x, most of a small decode's time)
            return self._band(x, weight, bias, ho, wo, p)
        if p:
            x = zero_pad(x, p, p, p, p)
        bands = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            bands.append(self._band(x[:, :, r0 * s:(r1 - 1) * s + k], weight, bias, r1 - r0, wo))
        return ops.concat(bands, axis=2)

    def _band(self, x, weight, bias, rows: int, wo: int, padding: int = 0):
        """Output rows of the input rows ``x``, zero-padded by ``padding``: (B, O, rows, wo)."""
        cols = ops.unfold(x, self.kernel_size, 1, padding, self.stride)  # (B, C*k*k, rows*wo)
        return (_weight_matmul(weight, cols) + bias).reshape(x.shape[0], weight.shape[0], rows, wo)


def _weight_matmul(weight, cols):
    """(O, K) @ (B, K, N) -> (B, O, N). A single image (every decode) takes the 2-D matmul
    kernel, which runs these wide shapes about 1.3x faster than the batched one on CPU."""
    b, k, n = cols.shape
    if b == 1:
        return ops.matmul(weight, cols.reshape(k, n)).reshape(1, weight.shape[0], n)
    return ops.matmul(weight, cols)


def split_moments(moments):
    """(B, 2C, h, w) encoder output -> posterior mean and clamped log-variance, (B, C, h, w) fp32.

    Sliced rather than ``ops.chunk``, which loses the static shape inside a compiled graph.
    """
    c = moments.shape[1] // 2
    moments = moments.astype(ms.float32)
    return moments[:, :c], ops.clamp(moments[:, c:], -30.0, 20.0)


class GroupNorm(nn.Cell):
    """GroupNorm with torch's parameter names (weight, bias), computed in fp32, followed by
    SiLU when ``silu`` (every norm of the VAE but the attention's).

    ``batch_norm_stats``: take the statistics from the batch-norm kernel, one channel per
    (image, group). The compiled decode on CPU does, where MindSpore 2.10 runs it 2-2.5x faster
    than its GroupNorm kernel (eagerly 3x slower). Its variance sums in one pass (within a few
    1e-6 for the small groups of a compiled decode), and its backward is not GroupNorm's
    gradient: inference only.

    ``on_host`` (set by ``AutoencoderKL`` on CPU): run eagerly in NumPy, on the tensor's memory
    (``group_norm_on_host``), also without a backward. MindSpore 2.10's eager CPU GroupNorm
    kernel took 166 ms a call, a third of a 512px SDXL decode's kernel time.
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-6, silu: bool = False):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = Parameter(initializer("ones", (channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (channels,), ms.float32), name="bias")
        self._batch_norm = ops.BatchNorm(is_training=True, epsilon=eps)
        self.on_host = False

    def construct(self, x, batch_norm_stats: bool = False):
        if self.on_host and not batch_norm_stats and not winograd.in_compiled_graph():
            return group_norm_on_host(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
        y = self._normalize(x, batch_norm_stats)
        return ops.silu(y) if self.silu else y

    def _normalize(self, x, batch_norm_stats: bool):
        if not batch_norm_stats:
            y = mint.nn.functional.group_norm(x.astype(ms.float32), self.num_groups, self.weight, self.bias, self.eps)
            return y.astype(x.dtype)
        b, c, h, w = x.shape
        rows = b * self.num_groups
        ones, zeros = ops.ones((rows,), ms.float32), ops.zeros((rows,), ms.float32)
        y = self._batch_norm(x.astype(ms.float32).reshape(1, rows, c // self.num_groups * h, w),
                             ones, zeros, zeros, ones)[0]
        y = y.reshape(b, c, h * w) * self.weight.reshape(1, c, 1) + self.bias.reshape(1, c, 1)
        return y.reshape(b, c, h, w).astype(x.dtype)


def group_norm_on_host(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float,
                       silu: bool = False) -> Tensor:
    """torch's ``group_norm`` in NumPy, then ``silu`` if asked, (B, C, H, W) -> same, an (image,
    group) per task of ``host_threads()``: NumPy releases the GIL in its passes. A (1, 128, 512,
    512) input took 69 ms against 336-382 ms in MindSpore 2.10's CPU kernel (Intel AMX machine).
    The SiLU runs on each group while it is in cache: with it, 44 ms against 81 ms for the NumPy
    norm followed by MindSpore's ``silu`` (AVX-512 machine)."""
    dtype = x.dtype
    if dtype != ms.float32:
        x = x.astype(ms.float32)
    array = x.asnumpy()  # the tensor's memory on CPU, not a copy
    b, c = array.shape[:2]
    groups = array.reshape(b * num_groups, c // num_groups, -1)
    out = np.empty_like(groups)
    scale = weight.asnumpy().reshape(num_groups, -1, 1)
    shift = bias.asnumpy().reshape(num_groups, -1, 1)

    def normalize(i):
        src, dst, g = groups[i], out[i], i % num_groups
        np.subtract(src, src.mean(dtype=np.float32), out=dst)
        dst *= scale[g] / np.sqrt(np.square(dst).mean(dtype=np.float32) + np.float32(eps))
        dst += shift[g]
        if silu:  # x / (1 + exp(-x)), as torch's CPU kernel
            denominator = np.negative(dst)
            np.exp(denominator, out=denominator)
            denominator += np.float32(1)
            dst /= denominator

    for _ in host_threads().map(normalize, range(b * num_groups)):  # iterating re-raises a task's exception
        pass
    y = Tensor.from_numpy(out.reshape(array.shape))
    return y if dtype == ms.float32 else y.astype(dtype)


class ResnetBlock(nn.Cell):
    """norm-SiLU-conv twice plus a (1x1-projected when C changes) skip: (B, C, H, W) -> (B, O, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dtype):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, silu=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1, dtype=dtype) if in_channels != out_channels else None

    def construct(self, x, batch_norm_stats: bool = False):
        h = self.conv1(self.norm1(x, batch_norm_stats))
        h = self.conv2(self.norm2(h, batch_norm_stats))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Cell):
    """Single-head self-attention over the H*W positions, residual: (B, C, H, W) -> same.

    Queries are processed in blocks so the (N, N) score matrix never exists whole
    (N = 16384 for a 1024px SDXL decode).
    """

    def __init__(self, channels: int, groups: int, dtype):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Dense(channels, channels, weight_init="zeros", dtype=dtype)
        self.to_k = nn.Dense(channels, channels, weight_init="zeros", dtype=dtype)
        self.to_v = nn.Dense(channels, channels, weight_init="zeros", dtype=dtype)
        self.to_out = nn.CellList([nn.Dense(channels, channels, weight_init="zeros", dtype=dtype)])

    def construct(self, x, batch_norm_stats: bool = False):
        b, c, h, w = x.shape
        n = h * w
        t = self.group_norm(x, batch_norm_stats).reshape(b, c, n).swapaxes(1, 2)
        # one head by reshape: indexing with [:, None] / [:, 0] compiles to slow strided copies
        q, k, v = (proj(t).reshape(b, 1, n, c) for proj in (self.to_q, self.to_k, self.to_v))
        out = math_attention(q, k, v, budget=_SCORES_BUDGET).reshape(b, n, c)
        return x + self.to_out[0](out).swapaxes(1, 2).reshape(b, c, h, w)


class Downsample(nn.Cell):
    """Pad right and bottom by one, then a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, dtype=dtype)

    def construct(self, x):
        return self.conv(zero_pad(x, 0, 1, 0, 1))


class Upsample(nn.Cell):
    """Nearest-neighbour 2x, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        b, c, h, w = x.shape
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class DownEncoderBlock(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool, dtype):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dtype)
                                    for i in range(num_layers)])
        self.downsamplers = nn.CellList([Downsample(out_channels, dtype)]) if downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool, dtype):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dtype)
                                    for i in range(num_layers)])
        self.upsamplers = nn.CellList([Upsample(out_channels, dtype)]) if upsample else None

    def construct(self, x, batch_norm_stats: bool = False):
        for resnet in self.resnets:
            x = resnet(x, batch_norm_stats)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Cell):
    """resnet, attention (unless ``mid_block_add_attention`` is false), resnet; C unchanged."""

    def __init__(self, channels: int, groups: int, add_attention: bool, dtype):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(channels, channels, groups, dtype) for _ in range(2)])
        self.attentions = nn.CellList([Attention(channels, groups, dtype)]) if add_attention else None

    def construct(self, x, batch_norm_stats: bool = False):
        x = self.resnets[0](x, batch_norm_stats)
        if self.attentions is not None:
            x = self.attentions[0](x, batch_norm_stats)
        return self.resnets[1](x, batch_norm_stats)


class Encoder(nn.Cell):
    """(B, in_channels, H, W) image -> (B, 2 * latent_channels, h, w) mean and log-variance."""

    def __init__(self, cfg: AutoencoderKLConfig, dtype):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1, dtype=dtype)
        self.down_blocks = nn.CellList([
            DownEncoderBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, i < len(chans) - 1, dtype)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, dtype)
        self.conv_norm_out = GroupNorm(groups, chans[-1], silu=True)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Cell):
    """(B, latent_channels, h, w) latents -> (B, out_channels, H, W) image."""

    def __init__(self, cfg: AutoencoderKLConfig, dtype):
        super().__init__()
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, chans[0], 3, padding=1, dtype=dtype)
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention, dtype)
        self.up_blocks = nn.CellList([
            UpDecoderBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, i < len(chans) - 1, dtype)
            for i, c in enumerate(chans)])
        self.conv_norm_out = GroupNorm(groups, chans[-1], silu=True)
        self.conv_out = Conv2d(chans[-1], cfg.out_channels, 3, padding=1, dtype=dtype)

    def construct(self, z, batch_norm_stats: bool = False):
        """``batch_norm_stats``: see ``GroupNorm``."""
        x = self.mid_block(self.conv_in(z), batch_norm_stats)
        for block in self.up_blocks:
            x = block(x, batch_norm_stats)
        return self.conv_out(self.conv_norm_out(x, batch_norm_stats))


class DiagonalGaussian:
    """The encoder's posterior, N(mean, exp(logvar)) per latent element; (B, C, h, w) fp32."""

    def __init__(self, moments: Tensor):
        self.mean, self.logvar = split_moments(moments)
        self.std = ops.exp(0.5 * self.logvar)
        self.var = ops.exp(self.logvar)

    def sample(self, noise) -> Tensor:
        """``mean + std * noise`` for standard-normal ``noise`` of the latents' shape."""
        noise = noise if isinstance(noise, Tensor) else Tensor(np.asarray(noise))
        return self.mean + self.std * noise.astype(ms.float32)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Cell):
    """The diffusers KL autoencoder: ``encode`` images to a posterior, ``decode`` latents.

    ``dtype`` is the weight and compute dtype (fp32 by default); fp16 is promoted to fp32
    when the config sets ``force_upcast`` (the SD and SDXL VAEs overflow in fp16).
    GroupNorm and the attention softmax always run in fp32. ``conv`` picks how convolutions
    run: ``im2col`` (im2col + matmul), ``native`` (``ops.conv2d``) or ``auto`` (im2col on CPU,
    native elsewhere), decided here once for every conv.
    """

    def __init__(self, config: AutoencoderKLConfig, dtype=ms.float32, conv: str = "auto"):
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype}")
        if conv not in ("auto", "im2col", "native"):
            raise ValueError(f"conv must be auto, im2col or native, got {conv!r}")
        self.config = config
        self.compute_dtype = ms.float32 if dtype == ms.float16 and config.force_upcast else dtype
        dtype = self.compute_dtype
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype)
        self.decoder = Decoder(config, dtype)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, dtype=dtype) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(latent, latent, 1, dtype=dtype) if config.use_post_quant_conv else None
        on_cpu = ms.get_context("device_target") == "CPU"
        im2col = on_cpu if conv == "auto" else conv == "im2col"
        for _, cell in self.cells_and_names():
            if isinstance(cell, Conv2d):
                cell.im2col = im2col
            if isinstance(cell, GroupNorm):
                cell.on_host = on_cpu
        self._cpu_kernels = im2col
        self._decoded_shapes = set()
        self._compiled_decode = jit(self._decode_in_graph)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.config.shift_factor or 0.0)

    def encode(self, x) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) images in [-1, 1], H and W multiples of the downsampling factor."""
        x = Tensor(x) if isinstance(x, np.ndarray) else x
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"encode expects (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                             f"got {tuple(x.shape)}")
        moments = self.encoder(x.astype(self.compute_dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z, tiled: bool = False, tile_latent_size: Optional[int] = None,
               overlap: float = 0.25) -> Tensor:
        """z: (B, latent_channels, h, w) VAE latents -> (B, out_channels, h*f, w*f) float32, about [-1, 1].

        With ``tiled``, latents larger than ``tile_latent_size`` (default: the config's
        ``sample_size / f``, 128 for SDXL) are decoded in tiles overlapping by ``overlap``
        of a tile and blended linearly across the overlap, as diffusers' ``tiled_decode``.
        """
        z = Tensor(z) if isinstance(z, np.ndarray) else z
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects (B, {self.config.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        tile = tile_latent_size or self.config.sample_size // self.config.downsample_factor
        if tiled and (z.shape[2] > tile or z.shape[3] > tile):
            return Tensor.from_numpy(self._tiled_decode(z, tile, overlap))
        return self._decode(z)

    def _decode(self, z) -> Tensor:
        """Eagerly the first time a shape comes, compiled when it comes again and is small: a
        compiled decode of the digits model's 20 images takes 0.05-0.06 s against 2.3 s, but the
        compile costs about 3.5 s, more than a one-off decode saves."""
        shape = tuple(z.shape)
        b, _, h, w = shape
        f = self.config.downsample_factor
        small = b * max(self.config.block_out_channels) * h * w * f * f <= COMPILED_DECODE_ELEMENTS
        if small and shape in self._decoded_shapes:
            return self._compiled_decode(z)
        self._decoded_shapes.add(shape)
        return self._run_decoder(z)

    def _run_decoder(self, z, batch_norm_stats: bool = False) -> Tensor:
        z = z.astype(self.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, batch_norm_stats).astype(ms.float32)

    def _decode_in_graph(self, z) -> Tensor:
        return self._run_decoder(z, self._cpu_kernels)

    def _tiled_decode(self, z, tile: int, overlap: float) -> np.ndarray:
        """Row-major over tiles; each tile is blended, in order, with the final (already blended)
        tile above and the one to its left, then cropped to its non-overlapping part. Only the
        previous row of tiles is kept."""
        tile_px = tile * self.config.downsample_factor
        stride = int(tile * (1 - overlap))
        blend = int(tile_px * overlap)
        keep = tile_px - blend
        if stride < 1:
            raise ValueError(f"overlap {overlap} leaves no stride for {tile}-latent tiles")
        rows, above = [], None
        for i in range(0, z.shape[2], stride):
            row = []
            for j in range(0, z.shape[3], stride):
                t = self._decode(z[:, :, i:i + tile, j:j + tile]).asnumpy()
                if above is not None:
                    _blend(above[len(row)], t, blend, axis=2)
                if row:
                    _blend(row[-1], t, blend, axis=3)
                row.append(t)
            rows.append(np.concatenate([t[:, :, :keep, :keep] for t in row], axis=3))
            above = row
        return np.concatenate(rows, axis=2)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=ms.float32, conv: str = "auto") -> "AutoencoderKL":
        """Build from ``folder/config.json`` and load ``diffusion_pytorch_model.safetensors``.

        Old diffusers exports that name the attention ``query/key/value/proj_attn`` load too.
        Raises ``ModelLoadError`` when the folder is unusable.
        """
        raw = read_folder_config(folder, "VAE")
        try:
            config = AutoencoderKLConfig.from_hf(raw)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"VAE: {folder}/config.json: {e}") from None
        model = cls(config, dtype, conv)
        load_folder_weights(model, folder, "diffusion_pytorch_model", rename=_checkpoint_name_to_param)
        model.set_train(False)
        return model


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """In place: ramp the first ``extent`` rows (axis 2) or columns (axis 3) of ``b`` from the
    last ones of ``a`` (weight 1 - y/extent) to ``b``'s own (weight y/extent)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    a, b = np.swapaxes(a, axis, -1), np.swapaxes(b, axis, -1)  # views: writing b writes the tile
    ramp = np.arange(extent, dtype=np.float32) / extent
    b[..., :extent] = a[..., a.shape[-1] - extent:] * (1 - ramp) + b[..., :extent] * ramp


_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _checkpoint_name_to_param(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    parent, _, last = module.rpartition(".")
    if ".attentions." in name and last in _OLD_ATTENTION_NAMES:
        return f"{parent}.{_OLD_ATTENTION_NAMES[last]}.{leaf}"
    return name
