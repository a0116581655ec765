"""PixArt-α / PixArt-Σ diffusion transformer as MindSpore cells.

A DiT whose blocks are conditioned on the timestep through adaLN-single (one shared
``t_block`` projection plus a learned ``scale_shift_table`` per block) and on the text
through cross-attention to T5 tokens. Parameter names equal the keys of the official
``.pth`` checkpoints, so they load one to one.

Shapes used throughout:
    B  batch            C  latent channels (4)        H, W  latent height, width
    p  patch size       h, w = H/p, W/p               N = h*w image tokens
    D  hidden size      L  caption tokens (300 Σ, 120 α)  Ct caption channels (4096)
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from pixart.errors import ConfigError
from pixart.models.attention import attention, broadcast_rows, heads_first, tokens_first
from pixart.runtime import jit

MASK_BIAS = -10000.0  # what diffusers adds for padded caption tokens; exp() of it is 0 in fp32


@dataclasses.dataclass
class PixArtConfig:
    """Architecture of a PixArt transformer. XL/2 defaults; see ``PRESETS`` for checkpoints."""
    checkpoint_key: ClassVar[str] = "pixart_config"  # the entry of our .ckpt files holding it
    input_size: int = 128           # latent side the checkpoint was trained at (image side / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300     # T5 tokens: 300 for Σ, 120 for α
    learn_sigma: bool = True        # 2C outputs: eps and the variance interpolation values
    pe_interpolation: float = 1.0
    base_size: Optional[int] = None  # position grid unit; input_size // patch_size when None
    multi_scale: bool = True        # PixArtMS (any size) vs PixArt (input_size only)
    micro_condition: bool = False   # size and aspect-ratio embeddings (PixArt-α 1024-MS)
    kv_compress_layers: Sequence[int] = ()
    kv_compress_ratio: int = 2
    kv_compress_sampling: str = "conv"  # conv | ave | uniform
    qk_norm: bool = False
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        self.kv_compress_layers = tuple(int(i) for i in self.kv_compress_layers)
        if self.base_size is None:
            self.base_size = self.input_size // self.patch_size
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must be a positive divisor of hidden_size {self.hidden_size}, "
                             f"got {self.num_heads}")
        if self.kv_compress_sampling not in ("conv", "ave", "uniform"):
            raise ValueError(f"kv_compress_sampling must be conv, ave or uniform, not {self.kv_compress_sampling!r}")
        if self.micro_condition and self.hidden_size % 3:
            raise ValueError(f"micro-conditions need hidden_size divisible by 3, got {self.hidden_size}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kv_compress_layers"] = list(self.kv_compress_layers)
        if d["base_size"] == self.input_size // self.patch_size:
            del d["base_size"]  # derived: follows input_size when that is overridden
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PixArtConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PixArt config keys: {', '.join(unknown)}")
        return cls(**d)


XL2 = dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16)
PRESETS = {
    "PixArt-Sigma-XL-2-256x256": PixArtConfig(input_size=32, pe_interpolation=0.5, multi_scale=False, **XL2),
    "PixArt-Sigma-XL-2-512-MS": PixArtConfig(input_size=64, pe_interpolation=1.0, **XL2),
    "PixArt-Sigma-XL-2-1024-MS": PixArtConfig(input_size=128, pe_interpolation=2.0, **XL2),
    "PixArt-Sigma-XL-2-2K-MS": PixArtConfig(input_size=256, pe_interpolation=4.0, **XL2),
    "PixArt-Sigma-XL-2-2K-MS-KV-Compress": PixArtConfig(
        input_size=256, pe_interpolation=4.0, kv_compress_layers=tuple(range(14, 28)), **XL2),
    "PixArt-XL-2-512x512": PixArtConfig(input_size=64, pe_interpolation=1.0, model_max_length=120, **XL2),
    "PixArt-XL-2-1024-MS": PixArtConfig(input_size=128, pe_interpolation=2.0, model_max_length=120,
                                        micro_condition=True, **XL2),
}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation a layer computes with, decided once when the model is built.

    attention: ``math`` (scores and softmax as matmuls, in query chunks; any device and dtype)
    or ``flash`` (MindSpore's fused ``flash_attention_score``: Atlas A2/A3, fp16/bf16 only);
    see ``pixart.models.attention``.
    gelu: ``composed`` (``x * sigmoid(...)``, four elementwise ops: on CPU about 4x faster than
    MindSpore's fused kernel) or ``fused`` (``ops.gelu(approximate="tanh")``). Both are the
    tanh approximation.
    heads: how attention splits the heads off and joins them again: ``gather`` (a Gather of rows;
    on CPU a compiled Transpose keeps buffers for the life of the graph) or ``transpose``.

    The default, ``Kernels()``, runs everywhere; ``for_device`` picks the fastest for a device.
    """
    attention: str = "math"
    gelu: str = "composed"
    heads: str = "gather"

    def __post_init__(self):
        if self.attention not in ("math", "flash"):
            raise ValueError(f"attention kernel must be math or flash, not {self.attention!r}")
        if self.gelu not in ("composed", "fused"):
            raise ValueError(f"gelu kernel must be composed or fused, not {self.gelu!r}")
        if self.heads not in ("gather", "transpose"):
            raise ValueError(f"heads must be split by gather or transpose, not {self.heads!r}")

    @classmethod
    def for_device(cls, device: str, dtype=ms.float32, attention: str = "auto") -> "Kernels":
        """The kernels for ``device`` (CPU, GPU, Ascend) in ``dtype``: ``attention`` auto is flash
        where flash_attention_score can run, math elsewhere; math or flash forces one (flash where
        it cannot run is a ConfigError saying why)."""
        from pixart.models.attention import choose_attention

        cpu = device == "CPU"
        return cls(attention=choose_attention(attention, device, dtype), gelu="composed" if cpu else "fused",
                   heads="gather" if cpu else "transpose")


class Conditioning(NamedTuple):
    """What the transformer is conditioned on besides the timestep, for a batch of B samples.

    caption: (B, L, Ct) T5 features; caption_mask: (B, L), 1 for real tokens and 0 for padding;
    resolution: (B, 2) image [height, width] and aspect_ratio: (B, 1) height/width, read by
    micro-conditioned models only; drop_caption: (B,) bool, True where training replaces the
    caption by the null caption; control: (B, C, H, W) the VAE latents of a control image, read
    by a ControlNet only. Build it with :meth:`of`, which fills what is not given with neutral
    values (every token real, micro-conditions 0, no caption dropped, no control image).

    It travels through the cells as one argument. Inside compiled code it arrives as a plain
    tuple in this field order, and cells unpack it (``caption, mask, ... = cond``) rather than
    read attributes: MindSpore 2.10 mis-types a NamedTuple handed into a cell in graph mode. At an
    ``ms.jit`` boundary pass it splatted (``fn(x, t, *cond)``, then ``model(x, t, fields)``):
    the tensors of a tuple argument would be taken as constants, compiling again for every new
    value. No field is ever None, so no ``is None`` test depends on what a tuple carries.
    """
    caption: Tensor
    caption_mask: Tensor
    resolution: Tensor
    aspect_ratio: Tensor
    drop_caption: Tensor
    control: Tensor

    @classmethod
    def of(cls, caption, caption_mask=None, resolution=None, aspect_ratio=None, drop_caption=None,
           control=None) -> "Conditioning":
        """Tensors (or NumPy arrays) for the fields given, neutral values for the others."""
        caption = np.asarray(caption, np.float32) if isinstance(caption, np.ndarray) else caption
        b, length = caption.shape[:2]

        def tensor(value, default, dtype):
            value = default if value is None else value
            return value if isinstance(value, Tensor) else Tensor(np.asarray(value, dtype))

        return cls(tensor(caption, None, np.float32), tensor(caption_mask, np.ones((b, length)), np.int32),
                   tensor(resolution, np.zeros((b, 2)), np.float32), tensor(aspect_ratio, np.zeros((b, 1)), np.float32),
                   tensor(drop_caption, np.zeros((b,), bool), np.bool_),
                   tensor(control, np.zeros((b, 1, 1, 1)), np.float32))


# ----------------------------------------------------------------------------------------
# Fixed embeddings (computed on the host: they depend on shapes only, which are static)
# ----------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def sincos_pos_embed_2d(dim: int, h: int, w: int, pe_interpolation: float, base_size: int) -> np.ndarray:
    """2-D sin-cos position embedding of the official model, (h*w, dim) float32.

    Grid coordinates are ``arange(n) / (n / base_size) / pe_interpolation`` in float32, so a
    model trained at one resolution sees the same coordinate range at another. The first
    half of the channels encodes the column (w) coordinate, the second the row (h); each
    half is ``[sin, cos]`` of the coordinate times 10000^(-k/(dim/4)), computed in float64.
    """
    grid_h = np.arange(h, dtype=np.float32) / (h / base_size) / pe_interpolation
    grid_w = np.arange(w, dtype=np.float32) / (w / base_size) / pe_interpolation
    cols, rows = np.meshgrid(grid_w, grid_h)  # each (h, w)
    omega = np.arange(dim // 4, dtype=np.float64) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega

    def one_axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def traced_pos_embed_2d(dim: int, h, w, pe_interpolation: float, base_size: int):
    """``sincos_pos_embed_2d`` as graph operations, for a token grid h x w known only when the
    graph runs; the same float32 values bit for bit (the grid in float32, its products with the
    frequencies and their sin/cos in float64)."""
    omega = Tensor(1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0)))

    def coordinates(n):
        count = ops.scalar_to_tensor(n, ms.float64)
        step = ops.cast(count / base_size, ms.float32)
        positions = ops.range(Tensor(0, ms.float32), ops.cast(count, ms.float32), Tensor(1, ms.float32))
        return positions / step / Tensor(pe_interpolation, ms.float32)

    def one_axis(pos):
        out = ops.cast(pos, ms.float64).reshape(-1, 1) * omega.reshape(1, -1)
        return ops.concat([ops.sin(out), ops.cos(out)], 1)

    cols = ops.broadcast_to(coordinates(w).reshape(1, -1), (h, w)).reshape(-1)
    rows = ops.broadcast_to(coordinates(h).reshape(-1, 1), (h, w)).reshape(-1)
    return ops.cast(ops.concat([one_axis(cols), one_axis(rows)], 1), ms.float32)


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0) -> np.ndarray:
    """Frequencies of the sinusoidal timestep embedding, (dim/2,) float32:
    ``exp(-log(max_period) k / (dim/2 - freq_shift))`` (``freq_shift`` 0 as PixArt and DiT; diffusers'
    DiT port uses 1).

    The exponent in float32 as diffusers computes it, its exp in float64 rounded once: that gives
    torch's float32 values (126 of 128 at dim 256; NumPy's float32 exp differs from it in 55).
    A 1-ulp error here becomes a 6e-5 error in sin(t * f) at t = 999."""
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half - freq_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------

class AdapterSlot(nn.Cell):
    """A layer that can carry an adapter: a cell added to its output (LoRA and the like).

    ``adapter(x)`` gets the layer's input (for a conv: the flattened patches, as the layer
    computes it) and returns an addition to its output. An adapter that has a weight form
    (``delta_weight()``: the change of ``weight`` with the same effect) can be merged into the
    weight, which removes its per-call cost. With no adapter the layer compiles as if the slot
    did not exist.
    """

    def __init__(self):
        super().__init__()
        self.adapter = None

    def attach_adapter(self, adapter: nn.Cell, name: str) -> None:
        """Carry ``adapter``; ``name`` is this layer's path in the model (``blocks.0.attn.qkv``),
        which the adapter's parameters are named under (``blocks.0.attn.qkv.adapter.<...>``): a
        compiled graph needs every parameter name unique."""
        self.adapter = adapter  # (assigning a cell re-prefixes its parameters: rename after)
        for local, param in adapter.parameters_and_names():
            param.name = f"{name}.adapter.{local}"

    def detach_adapter(self) -> Optional[nn.Cell]:
        adapter, self.adapter = self.adapter, None
        return adapter

    def adapted(self, x, y):
        """``y``, the layer's output for input ``x``, plus the adapter's addition if there is one."""
        if self.adapter is None:
            return y
        return y + self.adapter(x).astype(y.dtype)


def zeros_parameter(shape, name: str) -> Parameter:
    """An fp32 parameter of zeros. MindSpore fills it without a NumPy copy, which matters when
    the weights are loaded next: building XL with NumPy zeros spent 10-30 s touching 2.4 GB."""
    return Parameter(initializer("zeros", shape, ms.float32), name=name)


_matmul_by_transposed = ops.MatMul(transpose_b=True)


def dense(x, weight, bias=None):
    """``x W^T + b``, (..., in) -> (..., out), as ``MatMul(transpose_b)`` and ``BiasAdd`` over the
    rows of a 2-D view. In a compiled graph, MindSpore 2.10's CPU kernels for ``ops.dense`` and for a
    binary op that broadcasts (``+ b``) keep buffers for the life of the graph: the broadcast add
    one of its output's size (``broadcast_as``), a third of the XL/2 forward's memory at 512px;
    ``ops.dense``'s backward about three of the weight's size (measured on a 2304x2304 weight)."""
    y = _matmul_by_transposed(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        y = ops.bias_add(y, bias)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def broadcast_as(v, x):
    """``v`` broadcast to ``x``'s shape, for a binary op with ``x``: MindSpore 2.10's CPU kernels
    for binary ops that broadcast keep a buffer of their output's size for the life of a compiled
    graph, and ran 1.5x slower than ``BroadcastTo`` plus a same-shape op (measured on (2, 1024, 1152))."""
    return ops.broadcast_to(v, x.shape)


class Linear(AdapterSlot):
    """``y = x W^T + b`` with torch's parameter names and layout, (..., in) -> (..., out).

    Weights stay in their storage dtype (fp32 masters for training); the matmul runs in
    ``compute_dtype``, so one set of weights serves fp32, fp16 and bf16 execution.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=ms.float32):
        super().__init__()
        self.weight = zeros_parameter((out_features, in_features), "weight")
        self.bias = zeros_parameter((out_features,), "bias") if bias else None
        self.compute_dtype = compute_dtype

    def construct(self, x):
        w = self.weight
        b = self.bias
        if self.compute_dtype != ms.float32:
            x = x.astype(self.compute_dtype)
            w = w.astype(self.compute_dtype)
            b = None if b is None else b.astype(self.compute_dtype)
        return self.adapted(x, dense(x, w, b))


class ConvWeights(AdapterSlot):
    """Holds a conv's torch-named ``weight`` (out, in/groups, k, k) and ``bias`` (out,); the
    cells using it compute the conv as a matmul or a weighted sum, which is exact for the
    kernel = stride convolutions PixArt has."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = zeros_parameter((weight.shape[0],), "bias")


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in fp32; ``affine`` adds torch-named weight/bias."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.affine = affine
        if affine:
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
            self.weight = Parameter(Tensor(np.ones((dim,), np.float32)), name="weight")
            self.bias = Parameter(Tensor(np.zeros((dim,), np.float32)), name="bias")
        else:
            self.norm = Standardize(dim, eps)

    def construct(self, x):
        if not self.affine:
            return self.norm(x.astype(ms.float32)).astype(x.dtype)
        y, _, _ = self.norm(x.astype(ms.float32), self.weight, self.bias)
        return y.astype(x.dtype)


class Standardize(nn.Cell):
    """(x - mean) / sqrt(var + eps) over the last axis (fp32), with its own backward from row
    sums and elementwise ops: MindSpore 2.10's CPU LayerNormGrad makes the forward plus backward
    about 4x slower (7.5 against 1.8 ms at XL/2 256px, batch 2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.ones = Tensor(np.ones((dim,), np.float32))
        self.zeros = Tensor(np.zeros((dim,), np.float32))

    def construct(self, x):
        return self.layer_norm(x, self.ones, self.zeros)[0]

    def bprop(self, x, out, dout):
        d = x.shape[-1]
        x, g = x.reshape(-1, d), dout.reshape(-1, d)
        centred = x - broadcast_rows(x.sum(-1, keepdims=True) * (1.0 / d), d)
        rstd = broadcast_rows(ops.rsqrt((centred * centred).sum(-1, keepdims=True) * (1.0 / d) + self.eps), d)
        x_hat = centred * rstd
        g_mean = broadcast_rows(g.sum(-1, keepdims=True) * (1.0 / d), d)
        g_x_hat_mean = broadcast_rows((g * x_hat).sum(-1, keepdims=True) * (1.0 / d), d)
        return ((g - g_mean - x_hat * g_x_hat_mean) * rstd).reshape(dout.shape),


_GELU_A, _GELU_B = 1.5957691216057308, 0.0713548162726009  # 2 sqrt(2/pi), and times 0.044715


class _GeluTanhComposed(nn.Cell):
    """tanh-approximate GELU written as ``x * sigmoid(u)``, ``u = 2 sqrt(2/pi) (x + 0.044715 x^3)``,
    which equals ``0.5 x (1 + tanh(u / 2))``; its backward recomputes ``sigmoid(u)`` from ``x``:
    autodiff's kept some of the forward's intermediates, each the size of the MLP's hidden
    activations, until the backward (10-16 MB a block in an XL/2 train step at 256px, batch 2)."""

    def construct(self, x):
        return x * ops.sigmoid(x * (_GELU_A + _GELU_B * (x * x)))

    def bprop(self, x, out, dout):
        # d/dx x s(u) = s + x s (1 - s) u',  u' = a + 3 b x^2
        square = x * x
        s = ops.sigmoid(x * (_GELU_A + _GELU_B * square))
        return dout * (s * (1.0 + x * (1.0 - s) * (_GELU_A + 3.0 * _GELU_B * square))),


gelu_tanh_composed = _GeluTanhComposed()


class Mlp(nn.Cell):
    """fc1 -> tanh-GELU -> fc2, (..., in) -> (..., out)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, compute_dtype=ms.float32,
                 kernels: Kernels = Kernels()):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features, compute_dtype=compute_dtype)
        self.fc2 = Linear(hidden_features, out_features, compute_dtype=compute_dtype)
        self.composed_gelu = kernels.gelu == "composed"

    def construct(self, x):
        h = self.fc1(x)
        h = gelu_tanh_composed(h) if self.composed_gelu else ops.gelu(h, approximate="tanh")
        return self.fc2(h)


class SelfAttention(nn.Cell):
    """Self-attention over image tokens with optional qk-norm and KV token compression.

    KV compression (PixArt-Σ 2K/4K) shrinks keys and values ``ratio``-fold along each axis
    of the token grid before attention: ``conv`` with a depthwise conv (``sr``) and an affine
    LayerNorm (``norm``), ``ave``/``uniform`` by taking every ``ratio``-th token (the
    official ``ave`` is a nearest-neighbour resize, which selects the same tokens).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, kv_ratio: int = 1,
                 kv_sampling: str = "conv", compute_dtype=ms.float32, kernels: Kernels = Kernels()):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, compute_dtype=compute_dtype)
        self.proj = Linear(dim, dim, compute_dtype=compute_dtype)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = LayerNorm(dim, eps=1e-5, affine=True)
            self.k_norm = LayerNorm(dim, eps=1e-5, affine=True)
        self.kv_ratio = kv_ratio
        self.kv_sampling = kv_sampling
        if kv_ratio > 1 and kv_sampling == "conv":
            # depthwise conv, kernel = stride = ratio, initialised to an average as officially
            self.sr = ConvWeights(np.full((dim, 1, kv_ratio, kv_ratio), 1.0 / kv_ratio ** 2, np.float32))
            self.norm = LayerNorm(dim, eps=1e-5, affine=True)
        self.attention_kernel = kernels.attention
        self.gather_heads = kernels.heads == "gather"

    def _compress(self, t, h, w):
        """(B, h*w, D) -> (B, (h/r)*(w/r), D)."""
        r = self.kv_ratio
        b, _, d = t.shape
        grid = t.reshape(b, h // r, r, w // r, r, d)
        if self.kv_sampling == "conv":
            # depthwise conv with kernel = stride = r is a weighted sum inside each r×r cell
            kernel = self.sr.weight.reshape(d, r, r).transpose(1, 2, 0).reshape(1, 1, r, 1, r, d)
            t = (grid * kernel.astype(t.dtype)).sum(axis=(2, 4)) + self.sr.bias.astype(t.dtype)
            return self.norm(t.reshape(b, -1, d))
        return grid[:, :, 0, :, 0, :].reshape(b, -1, d)

    def construct(self, x, h: int, w: int):
        """x: (B, N, D) with N = h*w -> (B, N, D)."""
        d = x.shape[-1]
        q, k, v = ops.split(self.qkv(x), d, axis=-1)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.kv_ratio > 1:
            if h % self.kv_ratio or w % self.kv_ratio:
                raise ValueError(f"KV compression ratio {self.kv_ratio} needs a token grid divisible by it, "
                                 f"got {h}x{w}")
            k = self._compress(k, h, w)
            v = self._compress(v, h, w)
        q, k, v = (heads_first(t, self.num_heads, self.gather_heads) for t in (q, k, v))
        out = attention(q, k, v, kernel=self.attention_kernel)
        return self.proj(tokens_first(out, self.gather_heads))


class CrossAttention(nn.Cell):
    """Image tokens attend to caption tokens: (B, N, D), (B, L, D), bias (B, 1, 1, L) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, compute_dtype=ms.float32, kernels: Kernels = Kernels()):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = Linear(dim, dim, compute_dtype=compute_dtype)
        self.kv_linear = Linear(dim, dim * 2, compute_dtype=compute_dtype)
        self.proj = Linear(dim, dim, compute_dtype=compute_dtype)
        self.attention_kernel = kernels.attention
        self.gather_heads = kernels.heads == "gather"

    def construct(self, x, y, bias):
        k, v = ops.split(self.kv_linear(y), x.shape[-1], axis=-1)
        q, k, v = (heads_first(t, self.num_heads, self.gather_heads) for t in (self.q_linear(x), k, v))
        out = attention(q, k, v, bias, kernel=self.attention_kernel)
        return self.proj(tokens_first(out, self.gather_heads))


_batched_matmul = ops.BatchMatMul()


def token_sum(t):
    """(B, N, D) -> (B, 1, D), the sum over the tokens, as a product with a row of ones: MindSpore
    2.10's CPU ``ReduceSum`` over a middle axis took 1.3 ms for (2, 256, 1152) where this takes 0.2
    (6.7 against 0.25 ms at 1024 tokens)."""
    return _batched_matmul(ops.ones((t.shape[0], 1, t.shape[1]), t.dtype), t)


class Modulate(nn.Cell):
    """adaLN modulation x (1 + scale) + shift: x (B, N, D), shift/scale (B, 1, D), with its
    backward summing over the tokens by ``token_sum`` (autodiff's backward of the broadcast is a
    slow ``ReduceSum`` over the middle axis, about 4% of an XL/2 train step)."""

    def construct(self, x, shift, scale):
        return x * broadcast_as(1 + scale, x) + broadcast_as(shift, x)

    def bprop(self, x, shift, scale, out, dout):
        return dout * broadcast_as(1 + scale, dout), token_sum(dout), token_sum(dout * x)


class Gated(nn.Cell):
    """gate * y for a gate (B, 1, D) and y (B, N, D), with its backward as ``Modulate``'s."""

    def construct(self, gate, y):
        return broadcast_as(gate, y) * y

    def bprop(self, gate, y, out, dout):
        return token_sum(dout * y), dout * broadcast_as(gate, dout)


modulate, gated = Modulate(), Gated()


class PixArtBlock(nn.Cell):
    """adaLN-single DiT block: self-attention, cross-attention (no gate), MLP.

    ``scale_shift_table`` (6, D) plus the shared timestep projection gives shift, scale and
    gate for the attention and the MLP branches.
    """

    def __init__(self, cfg: PixArtConfig, kv_ratio: int = 1, compute_dtype=ms.float32, kernels: Kernels = Kernels()):
        super().__init__()
        self.config, self.kernels = cfg, kernels  # what a copy of this block is built from
        dim = cfg.hidden_size
        self.norm1 = LayerNorm(dim)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, kv_ratio, cfg.kv_compress_sampling, compute_dtype,
                                  kernels)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, compute_dtype, kernels)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), dim, compute_dtype, kernels)
        self.scale_shift_table = zeros_parameter((6, dim), "scale_shift_table")

    def enable_recompute(self):
        """Recompute the attention, cross-attention and MLP activations in the backward pass.
        Not the whole block cell: with the block's own modulation ops marked too, MindSpore 2.10's
        recompute pass made a cycle in the gradient graph (a recomputed ``t6`` reshape waiting for
        a gradient that needs it)."""
        for branch in (self.attn, self.cross_attn, self.mlp):
            branch.recompute()

    def construct(self, x, inputs, h: int, w: int):
        """x (B, N, D), inputs = (caption tokens (B, L, D), t6 (B, 6D), caption bias (B, 1, 1, L))
        -> (B, N, D)."""
        caption, t6, caption_bias = inputs
        b = x.shape[0]
        mod = self.scale_shift_table.astype(x.dtype) + t6.reshape(b, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, 1, axis=1)
        x = x + gated(gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), h, w))
        x = x + self.cross_attn(x, caption, caption_bias)
        x = x + gated(gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class TimestepEmbedder(nn.Cell):
    """Scalar -> 256 sinusoidal frequencies ``[cos, sin]`` -> Linear-SiLU-Linear: (M,) -> (M, out)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, compute_dtype=ms.float32, freq_shift: int = 0):
        super().__init__()
        self.freqs = Tensor(timestep_frequencies(freq_dim, freq_shift=freq_shift))
        self.mlp = nn.SequentialCell([Linear(freq_dim, out_dim, compute_dtype=compute_dtype), nn.SiLU(),
                                      Linear(out_dim, out_dim, compute_dtype=compute_dtype)])

    def construct(self, t):
        return self.embed(t)

    def embed(self, t):
        args = t.astype(ms.float32)[:, None] * self.freqs[None]
        return self.mlp(ops.concat([ops.cos(args), ops.sin(args)], axis=-1))


class SizeEmbedder(TimestepEmbedder):
    """Micro-condition embedding: each of the S values per sample is embedded like a timestep
    and the results concatenated: (B, S) -> (B, S*out)."""

    def construct(self, s):
        b = s.shape[0]
        return self.embed(s.reshape(-1)).reshape(b, -1)


def random_null_caption(rng: np.random.Generator, tokens: int, channels: int) -> np.ndarray:
    """The official initialisation of ``y_embedding``, (tokens, channels): randn / sqrt(channels)."""
    return (rng.standard_normal((tokens, channels)) / channels ** 0.5).astype(np.float32)


class CaptionEmbedder(nn.Cell):
    """T5 features -> hidden size, (B, L, Ct) -> (B, L, D). ``y_embedding`` (L, Ct) is the learned
    null caption that replaces dropped captions in training (classifier-free guidance)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int, compute_dtype=ms.float32,
                 kernels: Kernels = Kernels()):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size, compute_dtype, kernels)
        self.y_embedding = Parameter(Tensor(np.zeros((token_num, in_channels), np.float32)), name="y_embedding",
                                     requires_grad=False)

    def construct(self, y, drop):
        """drop: (B,) bool, True where the caption is replaced by the null caption. A caption
        shorter than ``token_num`` (padding trimmed, see ``TextEmbeddings.trimmed``) is replaced
        by as many leading null-caption tokens."""
        y = ops.where(drop[:, None, None], self.y_embedding[:y.shape[1]].astype(y.dtype)[None], y)
        return self.y_proj(y)


class FinalLayer(nn.Cell):
    """LayerNorm, modulation by ``scale_shift_table`` (2, D) + t, projection to p*p*out channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, compute_dtype=ms.float32):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, compute_dtype=compute_dtype)
        self.scale_shift_table = zeros_parameter((2, hidden_size), "scale_shift_table")

    def construct(self, x, t):
        """x (B, N, D), t (B, D) -> (B, N, p*p*out)."""
        shift, scale = ops.split(self.scale_shift_table.astype(x.dtype)[None] + t[:, None], 1, axis=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Cell):
    """Non-overlapping p×p patches -> tokens, (B, C, H, W) -> (B, h*w, D), rows first.

    Stored as the official conv weight (D, C, p, p); a conv with kernel = stride = p is a
    matmul over flattened patches, which is what we compute. An adapter on ``proj`` sees the
    flattened patches (B, N, C*p*p), channels first within a patch as the weight's layout.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, compute_dtype=ms.float32):
        super().__init__()
        self.patch_size = patch_size
        self.proj = ConvWeights(np.zeros((hidden_size, in_channels, patch_size, patch_size), np.float32))
        self.compute_dtype = compute_dtype

    def construct(self, x):
        b, c, hh, ww = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        w = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        dt = self.compute_dtype
        patches = patches.astype(dt)
        return self.proj.adapted(patches, dense(patches, w.astype(dt), self.proj.bias.astype(dt)))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

# what every block reads besides the image tokens: (caption tokens (B, L, D), the timestep's adaLN
# projection t6 (B, 6D), the caption attention bias (B, 1, 1, L)), as a plain tuple
BlockInputs = Tuple[Tensor, Tensor, Tensor]
BlockRunner = Callable[[int, Tensor, BlockInputs, int, int], Tensor]


class PixArt(nn.Cell):
    """PixArt transformer for the square size it was trained at (the Σ 256px checkpoint).

    construct(x, timestep, cond)
        x: (B, C, H, W) noisy latents; timestep: (B,) float or int; cond: a ``Conditioning``
        (caption features and mask, micro-conditions, training-time caption dropout).
        Returns (B, out_channels, H, W) float32: eps, then the variance values when learn_sigma.

    The forward is three stages that other forwards reuse: ``embed`` (latents and conditioning
    to tokens and block inputs), ``run_blocks`` (the one block loop, which also takes per-block
    residuals from a control branch) and ``head`` (final layer and unpatchify).
    """
    conditioning = Conditioning  # what construct's ``cond`` is (trainers and samplers build it by its fields)

    def __init__(self, config: PixArtConfig, dtype=ms.float32, kernels: Optional[Kernels] = None,
                 initialize: bool = True):
        """``initialize=False`` leaves the weights zero, for a loader that sets them all next."""
        super().__init__()
        self.config = cfg = config
        self.dtype = dtype
        self.kernels = kernels = kernels or Kernels()
        self.symbolic_grid = False  # see use_symbolic_grid
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, dtype)
        self.t_embedder = TimestepEmbedder(d, compute_dtype=dtype)
        self.t_block = nn.SequentialCell([nn.SiLU(), Linear(d, 6 * d, compute_dtype=dtype)])
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, cfg.model_max_length, dtype, kernels)
        if cfg.micro_condition:
            self.csize_embedder = SizeEmbedder(d // 3, compute_dtype=dtype)
            self.ar_embedder = SizeEmbedder(d // 3, compute_dtype=dtype)
        self.blocks = nn.CellList([PixArtBlock(cfg, ratio, dtype, kernels) for ratio in self.block_kv_ratios()])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, dtype)
        if initialize:
            self.initialize_weights()

    def check_input_size(self, height: int, width: int):
        size = self.config.input_size
        if (height, width) != (size, size):
            raise ValueError(f"{type(self).__name__} runs at its trained latent size {size}x{size} only, "
                             f"got {height}x{width}; use PixArtMS for other sizes")

    def pos_embed(self, h: int, w: int):
        cfg = self.config
        if self.symbolic_grid:
            return traced_pos_embed_2d(cfg.hidden_size, h, w, float(cfg.pe_interpolation), int(cfg.base_size))
        return Tensor(sincos_pos_embed_2d(cfg.hidden_size, h, w, float(cfg.pe_interpolation), int(cfg.base_size)))

    def construct(self, x, timestep, cond: Conditioning):
        h, w = self.token_grid(x)
        x, t, inputs = self.embed(x, timestep, cond)
        x = self.run_blocks(x, inputs, h, w)
        return self.head(x, t, h, w)

    def token_grid(self, x):
        """(h, w) token grid of latents x (B, C, H, W), after checking H, W suit this model."""
        _, _, hh, ww = x.shape
        if not self.symbolic_grid:  # a symbolic size cannot be checked while tracing
            self.check_input_size(hh, ww)
        p = self.config.patch_size
        return hh // p, ww // p

    def embed(self, x, timestep, cond: Conditioning):
        """construct's inputs -> image tokens x (B, N, D), the timestep embedding t (B, D) and the
        ``BlockInputs`` every block reads."""
        caption, caption_mask, resolution, aspect_ratio, drop_caption, _ = cond
        b = x.shape[0]
        h, w = self.token_grid(x)
        x = self.x_embedder(x.astype(self.dtype)) + self.pos_embed(h, w).astype(self.dtype)[None]
        t = self.t_embedder(timestep)
        if self.config.micro_condition:
            t = t + ops.concat([self.csize_embedder(resolution), self.ar_embedder(aspect_ratio)], axis=1)
        t = t.astype(self.dtype)
        y = self.y_embedder(caption.astype(self.dtype), drop_caption)
        y_bias = ((1.0 - caption_mask.astype(ms.float32)) * MASK_BIAS).reshape(b, 1, 1, -1)
        return x, t, (y, self.t_block(t), y_bias)

    def run_blocks(self, x, inputs: BlockInputs, h: int, w: int, residuals=None, start: int = 0,
                   stop: Optional[int] = None, run_block: Optional[BlockRunner] = None):
        """Blocks ``start`` .. ``stop - 1`` (default: all) over image tokens x (B, N, D).

        residuals: None or a sequence whose entry k, (B, N, D), is added to the input of block
        ``start + k`` (a control branch's output). run_block(index, x, inputs, h, w) replaces
        calling the block cell (the streamed forward runs every block through one template).
        """
        stop = len(self.blocks) if stop is None else stop
        for index in range(start, stop):
            if residuals is not None and index - start < len(residuals):
                x = x + residuals[index - start]
            if run_block is None:
                x = self.blocks[index](x, inputs, h, w)
            else:
                x = run_block(index, x, inputs, h, w)
        return x

    def head(self, x, t, h: int, w: int):
        """Final layer and unpatchify: tokens (B, N, D), t (B, D) -> (B, out_channels, H, W) float32."""
        return self.unpatchify(self.final_layer(x, t), h, w).astype(ms.float32)

    def block_kv_ratios(self):
        """The KV-compression ratio of each block (1: no compression)."""
        cfg = self.config
        return [cfg.kv_compress_ratio if i in set(cfg.kv_compress_layers) else 1 for i in range(cfg.depth)]

    def unpatchify(self, x, h: int, w: int):
        """(B, h*w, p*p*out) -> (B, out, h*p, w*p)."""
        p = self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def adapter_slots(self):
        return linear_slots(self)

    def attach_adapters(self, adapters) -> None:
        """Attach {slot name: adapter cell}; an unknown slot name is a ValueError."""
        slots = self.adapter_slots()
        unknown = sorted(set(adapters) - set(slots))
        if unknown:
            raise ValueError(f"no adapter slot named {', '.join(unknown[:5])}")
        for name, adapter in adapters.items():
            slots[name].attach_adapter(adapter, name)

    def enable_recompute(self):
        """Activation checkpointing per block: recompute block activations in the backward pass."""
        for block in self.blocks:
            block.enable_recompute()

    def initialize_weights(self, seed: int = 0):
        """The official initialisation: xavier-uniform linears with zero bias, N(0, 0.02) for the
        embedding MLPs, zero cross-attention output and final projection, randn/sqrt(D) tables."""
        init = OfficialInit(self, seed)
        rng, set_ = init.rng, init.set
        normal_02 = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                     self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.config.micro_condition:
            normal_02 += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2],
                          self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for lin in normal_02:
            set_(lin.weight, rng.normal(0.0, 0.02, lin.weight.shape))
        d = self.config.hidden_size
        for block in self.blocks:
            set_(block.scale_shift_table, rng.standard_normal((6, d)) / d ** 0.5)
            set_(block.cross_attn.proj.weight, np.zeros(block.cross_attn.proj.weight.shape))
        final = self.final_layer
        set_(final.scale_shift_table, rng.standard_normal((2, d)) / d ** 0.5)
        set_(final.linear.weight, np.zeros(final.linear.weight.shape))
        set_(final.linear.bias, np.zeros(final.linear.bias.shape))
        set_(self.y_embedder.y_embedding, random_null_caption(rng, self.config.model_max_length,
                                                              self.config.caption_channels))


def linear_slots(model) -> dict:
    """{name: layer} of every layer of a PixArt or DiT that can carry an adapter (the Linears and
    the patch embedding), named as their weights are, without the ``.weight``."""
    slots = {name: cell for name, cell in model.cells_and_names() if isinstance(cell, Linear)}
    slots["x_embedder.proj"] = model.x_embedder.proj
    return slots


class OfficialInit:
    """What the official PixArt and DiT initialisations share: one NumPy stream of ``seed``, first
    xavier-uniform weights and zero biases for every Linear and for the patch embedding (as a
    linear over flattened patches), in the model's layer order; the model then sets the rest."""

    def __init__(self, model, seed: int):
        self.rng = np.random.default_rng(seed)
        for layer in linear_slots(model).values():
            fan_out, fan_in = layer.weight.shape[0], int(np.prod(layer.weight.shape[1:]))
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            self.set(layer.weight, self.rng.uniform(-bound, bound, layer.weight.shape))
            if layer.bias is not None:
                self.set(layer.bias, np.zeros(layer.bias.shape))

    @staticmethod
    def set(param, value) -> None:
        param.set_data(Tensor(np.asarray(value, np.float32)))


class PixArtMS(PixArt):
    """PixArt at any latent size and aspect ratio (the multi-scale checkpoints): the position
    embedding is recomputed for each h×w with the checkpoint's ``base_size`` and
    ``pe_interpolation``."""

    def check_input_size(self, height: int, width: int):
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")


def use_symbolic_grid(cell: nn.Cell) -> int:
    """Let a graph compiled over ``cell`` (a PixArt-MS, or an objective or ControlNet holding
    some) take latents of any height and width, so that one graph (``set_inputs`` with None
    dimensions) serves every bucket shape. In each PixArt inside: the position embedding is
    computed in the graph (``traced_pos_embed_2d``, the same values), math attention runs in one
    chunk (its chunking reads the token count), and the latent size is not checked while
    tracing (the bucket tables only hold sizes divisible by the patch). Returns how many
    PixArt models it changed."""
    models = [c for _, c in cell.cells_and_names() if isinstance(c, PixArt)]
    for model in models:
        if type(model) is PixArt:
            raise ConfigError(f"dynamic shapes need a multi-scale model: this one runs at "
                              f"{model.config.input_size}x{model.config.input_size} latents only")
        if any(ratio > 1 for ratio in model.block_kv_ratios()):
            raise ConfigError("dynamic shapes do not support KV compression (kv_compress_layers): "
                              "its token-grid check needs static shapes")
        model.symbolic_grid = True
    for _, c in cell.cells_and_names():
        if getattr(c, "attention_kernel", None) == "math":
            c.attention_kernel = "math_unchunked"
    return len(models)


def block_template(model: PixArt, kv_ratio: int):
    """(a block of ``model``'s configuration, its Parameters): the slots that a compiled graph
    fills with any block's weights (``ops.assign``, in ``get_parameters`` order) before running
    the template, so that one graph and one set of buffers serve every block."""
    template = PixArtBlock(model.config, kv_ratio, model.dtype, model.kernels)
    return template, list(template.get_parameters())


class BlockStreamedForward:
    """Compiled forward of a PixArt model with the memory of one block: ``model(...)``'s result.

    A whole-model graph on MindSpore 2.10's CPU runtime keeps some kernels' buffers for its
    life (XL/2 at 512px: 5.5 GiB for the model, see ``broadcast_as``). Here the embeddings, one
    block and the head are separate graphs, and the block graph takes a block's weights as
    inputs and copies them into a template block before running it, so all blocks share one
    compiled graph and one set of buffers. Each block costs one graph launch and a copy of its
    weights (85 MB at XL) on top of its compute. Adapters must be merged into the weights first.
    A ``ControlPixArt`` streams too: its control blocks run through the same template, their
    outputs are the block loop's per-block residuals.
    """

    def __init__(self, model):
        self.control = model if hasattr(model, "controlnet") else None
        self.model = model = model.base_model if self.control else model

        # plain functions, not ms.jit(model.embed): MindSpore 2.10 mixes up the graphs of
        # jitted bound methods with later whole-model graphs of the same cell
        def embed(x, timestep, *cond):
            return model.embed(x, timestep, cond)

        def head(x, t, h, w):
            return model.head(x, t, h, w)

        self._embed = jit(embed)
        self._head = jit(head)
        self._compiled_block = {ratio: self._compile_block(ratio) for ratio in set(model.block_kv_ratios())}

    def _compile_block(self, kv_ratio: int):
        template, slots = block_template(self.model, kv_ratio)
        for slot in slots:
            slot.requires_grad = False

        def run_block(x, h, w, caption, t6, caption_bias, *weights):
            for slot, value in zip(slots, weights):
                ops.assign(slot, value)
            return template(x, (caption, t6, caption_bias), h, w)

        return jit(run_block), len(slots)

    def _stream(self, block: "PixArtBlock", x, inputs: BlockInputs, h: int, w: int):
        compiled, num_weights = self._compiled_block[block.attn.kv_ratio]
        weights = list(block.get_parameters())
        if len(weights) != num_weights:
            raise ValueError("a block carries adapters: merge them into the weights before streaming")
        # plain tensors over the parameters' data: no copy, and no gradient tracking
        return compiled(x, h, w, *inputs, *(Tensor(p) for p in weights))

    def _run_block(self, index: int, x, inputs: BlockInputs, h: int, w: int):
        return self._stream(self.model.blocks[index], x, inputs, h, w)

    def _run_control(self, index: int, x, c, inputs: BlockInputs, h: int, w: int):
        block = self.control.controlnet[index]
        if index == 0:
            x = x + block.before_proj(c)
        c = self._stream(block.copied_block, x if index == 0 else c, inputs, h, w)
        return c, block.after_proj(c)

    def __call__(self, x, timestep, cond: Conditioning):
        model = self.model
        h, w = model.token_grid(x)
        x, t, inputs = self._embed(x, timestep, *cond)
        inputs = tuple(inputs)
        if self.control is None:
            x = model.run_blocks(x, inputs, h, w, run_block=self._run_block)
        else:
            x = model.run_blocks(x, inputs, h, w, stop=1, run_block=self._run_block)
            c = self.control.control_tokens(cond[5], h, w)
            residuals = self.control.control_residuals(x, c, inputs, h, w, run_control=self._run_control)
            x = model.run_blocks(x, inputs, h, w, residuals=residuals, start=1, run_block=self._run_block)
        return self._head(x, t, h, w)


def build_model(config: PixArtConfig, dtype=ms.float32, kernels: Optional[Kernels] = None,
                initialize: bool = True) -> PixArt:
    """PixArtMS for multi-scale configs, PixArt otherwise; ``kernels`` default to ``Kernels()`` (any
    device); ``initialize=False`` skips the official initialisation (all weights zero)."""
    return (PixArtMS if config.multi_scale else PixArt)(config, dtype=dtype, kernels=kernels, initialize=initialize)
