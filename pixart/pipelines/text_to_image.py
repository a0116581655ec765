"""Sampling with a PixArt transformer, as diffusers' ``PixArtSigmaPipeline`` does it, or with a
class-conditional DiT, as ``DiTPipeline`` and the official DiT ``sample.py`` do it.

Stages, each usable on its own so a caller can free one model before loading the next:
    text   prompts -> T5 embeddings + masks           (pixart.models.text_encoder)
           (a DiT: class ids, ``ClassLabels``)
    denoise latents <- sampler steps over the transformer with classifier-free guidance
    decode  latents -> VAE -> uint8 images, resized back from the resolution bucket

Conventions (diffusers'): the unconditional branch is the negative prompt (default "")
with its own tokens and mask, or a DiT's null class; guidance ``uncond + g * (cond - uncond)``
on the eps channels; with a learned variance the IDDPM sampler gets the conditional branch's
variance values. The official DiT ``forward_with_cfg`` guides only the first 3 of the 4 eps
channels (the fourth is the conditional branch's, unguided): ``guided_channels=3`` does that.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor, ops
from PIL import Image
from tqdm.auto import tqdm

from pixart.data.buckets import resize_and_center_crop, resolution_binning
from pixart.diffusion.samplers import make_sampler
from pixart.errors import InputError
from pixart.runtime import jit
from pixart.models.dit import ClassConditioning, DiTConfig
from pixart.models.text_encoder import unpadded_length
from pixart.models.pixart import BlockStreamedForward, Conditioning
from pixart.utils.seeds import image_seeds

EXECUTION_MODES = ("graph", "streamed", "pynative")
BINNING_TABLES = {32: 256, 64: 512, 128: 1024, 256: 2048}  # trained latent size -> bucket table
DECODE_LATENT_AREA = 128 * 128  # the latents of one 1024² image: the most one VAE decode call takes


@dataclasses.dataclass(frozen=True)
class SizeLimits:
    """Image sides a model accepts: from ``minimum`` to ``maximum`` pixels, multiples of ``step``
    where the size is sampled as asked (no resolution binning). One rule for sample.py and the
    web demo: up to twice the trained side (the aspect-ratio buckets reach 4:1 at about the
    trained area, and larger squares are far from what the model has seen); beyond it, latents
    and attention outgrow any memory."""
    minimum: int
    maximum: int
    step: int

    @classmethod
    def for_model(cls, input_size: int, patch_size: int, vae_factor: int) -> "SizeLimits":
        unit = vae_factor * patch_size
        return cls(unit, 2 * input_size * vae_factor, unit)

    def check(self, height: int, width: int) -> None:
        """InputError unless both sides are within the limits."""
        if not (self.minimum <= height <= self.maximum and self.minimum <= width <= self.maximum):
            raise InputError(f"image sides must be from {self.minimum} to {self.maximum} pixels for this model "
                             f"(twice the {self.maximum // 2} px it was trained at), got {height}x{width}")


@dataclasses.dataclass
class TextEmbeddings:
    """T5 output for a batch of prompts: embeddings (B, L, Ct) float32, mask (B, L) int."""
    embeddings: np.ndarray
    mask: np.ndarray

    def __len__(self):
        return len(self.embeddings)

    def repeat(self, n: int) -> "TextEmbeddings":
        """Each prompt n times in a row (n images per prompt)."""
        return TextEmbeddings(np.repeat(self.embeddings, n, axis=0), np.repeat(self.mask, n, axis=0))

    def take(self, index) -> "TextEmbeddings":
        return TextEmbeddings(self.embeddings[index], self.mask[index])

    @staticmethod
    def join(parts: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        """The rows of every part, in order (guidance: the unconditional rows, then the conditional)."""
        return TextEmbeddings(np.concatenate([p.embeddings for p in parts]), np.concatenate([p.mask for p in parts]))

    def trimmed(self) -> "TextEmbeddings":
        """The same texts without the trailing padding that every row has: their first
        ``unpadded_length(mask)`` tokens (a multiple of 64, or all). The transformer's output is
        the same (bit for bit in our runs), and the cross-attention's work on the padding is
        saved (XL/2 at 512px, 40 of 300 tokens kept: 5-9% of a denoising step; 13% at 256px).
        The official PixArt forward also drops the padding; diffusers' keeps all 300 tokens."""
        keep = unpadded_length(self.mask)
        return self if keep == self.mask.shape[1] else TextEmbeddings(self.embeddings[:, :keep], self.mask[:, :keep])

    def conditioning(self, height: int, width: int, control: Optional[np.ndarray] = None) -> Conditioning:
        """The transformer's conditioning for one row per text, sampling at height x width pixels,
        the captions ``trimmed``; ``control``: a ControlNet's control latents (1, C, h, w), the
        same for every row."""
        rows = len(self)
        text = self.trimmed()
        return Conditioning.of(text.embeddings, text.mask, resolution=np.tile([[height, width]], (rows, 1)),
                               aspect_ratio=np.full((rows, 1), height / width),
                               control=None if control is None else np.repeat(control, rows, axis=0))


@dataclasses.dataclass
class ClassLabels:
    """What a class-conditional DiT samples: labels (B,) int class ids; the model's ``num_classes``
    is the null class, the unconditional branch of guidance (``ClassLabels.null``)."""
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    @classmethod
    def null(cls, num_classes: int, rows: int = 1) -> "ClassLabels":
        return cls(np.full((rows,), num_classes, np.int32))

    def take(self, index) -> "ClassLabels":
        return ClassLabels(np.asarray(self.labels)[index])

    @staticmethod
    def join(parts: Sequence["ClassLabels"]) -> "ClassLabels":
        return ClassLabels(np.concatenate([np.asarray(p.labels) for p in parts]))

    def conditioning(self, height: int, width: int, control: Optional[np.ndarray] = None) -> ClassConditioning:
        if control is not None:
            raise InputError("a class-conditional DiT takes no control image")
        return ClassConditioning.of(np.asarray(self.labels, np.int32))


def bilinear_resize_and_crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, H, W) float -> (B, C, height, width): scale to cover, bilinear with half-pixel
    centres (torch ``interpolate(mode="bilinear", align_corners=False)``), then center crop,
    as diffusers' ``resize_and_crop_tensor``."""
    _, _, h, w = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    new_h, new_w = max(height, int(h * ratio)), max(width, int(w * ratio))

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, frac

    lo, hi, f = axis_weights(h, new_h)
    rows = images[:, :, lo, :] * (1 - f)[:, None] + images[:, :, hi, :] * f[:, None]
    lo, hi, f = axis_weights(w, new_w)
    out = rows[:, :, :, lo] * (1 - f) + rows[:, :, :, hi] * f
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return out[:, :, top:top + height, left:left + width]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output (B, C, H, W) in about [-1, 1] -> (B, H, W, C) uint8, as diffusers' postprocess."""
    images = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


class GuidedDenoiser:
    """The transformer as the samplers see it: ``(latents, t) -> model output`` with guidance.

    mode: ``graph`` compiles the whole guided forward, ``streamed`` compiles one block and runs
    every block's weights through it (``BlockStreamedForward``: the memory of one block, for
    large images on CPU), ``pynative`` runs eagerly. In both compiled modes each distinct input
    shape compiles once; timestep and guidance scale are tensor inputs, so steps, seeds,
    prompts and guidance values reuse the same graphs.

    guided_channels: how many leading eps channels guidance mixes (default: all of them); the
    others are the conditional branch's, as the variance values are.
    """

    def __init__(self, model, mode: str = "graph", guided_channels: Optional[int] = None):
        if mode not in EXECUTION_MODES:
            raise InputError(f"mode must be one of {', '.join(EXECUTION_MODES)}, got {mode!r}")
        channels = model.config.in_channels
        if guided_channels is not None and not 1 <= guided_channels <= channels:
            raise InputError(f"guided channels must be from 1 to the model's {channels}, got {guided_channels}")
        if mode == "streamed" and not hasattr(model, "run_blocks"):
            raise InputError("streamed mode runs PixArt blocks; use graph or pynative for this model")
        self.model = model
        self.forward = BlockStreamedForward(model) if mode == "streamed" else model
        self.guided_channels = guided_channels or channels
        compile_ = jit if mode == "graph" else (lambda fn: fn)
        self._guided = compile_(self._guided_forward)
        self._plain = compile_(self._plain_forward)

    def _guided_forward(self, x, t, guidance, *cond):
        """x (B, C, H, W); cond fields for 2B rows, the unconditional half first."""
        b = x.shape[0]
        c = self.guided_channels
        x2 = ops.concat([x, x], axis=0)
        t2 = ops.broadcast_to(t.reshape(1), (2 * b,))
        out = self.forward(x2, t2, cond)
        uncond, cond_out = out[:b], out[b:]
        eps = uncond[:, :c] + guidance * (cond_out[:, :c] - uncond[:, :c])
        return ops.concat([eps, cond_out[:, c:]], axis=1)

    def _plain_forward(self, x, t, *cond):
        t1 = ops.broadcast_to(t.reshape(1), (x.shape[0],))
        return self.forward(x, t1, cond)

    def __call__(self, latents: np.ndarray, t: int, cond, guidance_scale: Optional[float] = None
                 ) -> np.ndarray:
        """latents (B, C, h, w); cond for B rows, or for 2B rows (unconditional first) with a
        guidance scale. Returns (B, out_channels, h, w) float32."""
        x = Tensor(latents.astype(np.float32))
        tt = Tensor(np.array(t, np.float32))
        if guidance_scale is None:
            return self._plain(x, tt, *cond).asnumpy()
        return self._guided(x, tt, Tensor(np.float32(guidance_scale)), *cond).asnumpy()


@dataclasses.dataclass
class SamplingResult:
    images: np.ndarray          # (B, H, W, 3) uint8 at the requested size
    generated_size: Tuple[int, int]  # (height, width) actually sampled (the resolution bucket)
    seconds_per_step: float
    total_seconds: float


class PixArtPipeline:
    """Transformer + VAE sampling from precomputed text embeddings (or a DiT's class labels).

    ``transformer`` is a loaded PixArt (or DiT) cell; ``vae`` an ``AutoencoderKL``. Text encoding
    is separate (see ``pixart.models.text_encoder``) so the 4.7B-parameter T5 can be released
    before these models are loaded. ``guided_channels``: see ``GuidedDenoiser``.
    """

    def __init__(self, transformer, vae, mode: str = "graph", tiled_decode: bool = True,
                 guided_channels: Optional[int] = None):
        self.transformer = transformer
        self.vae = vae
        self.denoiser = GuidedDenoiser(transformer, mode, guided_channels)
        self.tiled_decode = tiled_decode
        self.vae_factor = vae.config.downsample_factor
        self.patch = transformer.config.patch_size

    @property
    def trained_size(self) -> int:
        """The square image side, in pixels, the transformer was trained at (latent size x VAE factor)."""
        return self.transformer.config.input_size * self.vae_factor

    @property
    def controlled(self) -> bool:
        """Whether the transformer carries a ControlNet branch (and so needs a control image)."""
        return hasattr(self.transformer, "controlnet")

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits.for_model(self.transformer.config.input_size, self.patch, self.vae_factor)

    def generation_size(self, height: int, width: int, use_resolution_binning: bool) -> Tuple[int, int]:
        """The (height, width) to sample at: the nearest bucket of the model's table when binning
        (PixArt's aspect-ratio tables; a DiT saw squares only and samples as asked)."""
        limits = self.size_limits
        limits.check(height, width)
        input_size = self.transformer.config.input_size
        if use_resolution_binning and input_size in BINNING_TABLES and not isinstance(self.transformer.config, DiTConfig):
            height, width = resolution_binning(height, width, BINNING_TABLES[input_size])
        unit = limits.step
        if height % unit or width % unit:
            raise InputError(f"height and width must be multiples of {unit} (VAE factor {self.vae_factor} x "
                             f"patch {self.patch}), got {height}x{width}")
        return height, width

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
        """(B, C, h, w) standard normal, row i drawn from ``seeds[i]`` alone, so any image can be
        regenerated by itself from its seed."""
        shape = (self.transformer.config.in_channels, height // self.vae_factor, width // self.vae_factor)
        return np.stack([np.random.default_rng(s).standard_normal(shape).astype(np.float32) for s in seeds])

    def __call__(self, cond: Union[TextEmbeddings, ClassLabels], uncond: Optional[Union[TextEmbeddings, ClassLabels]],
                 height: int, width: int,
                 sampling_method: str = "dpm", sampling_steps: int = 20, guidance_scale: float = 4.5,
                 seeds: Optional[Sequence[int]] = None, latents: Optional[np.ndarray] = None,
                 use_resolution_binning: bool = True, progress: bool = True,
                 step_callback: Optional[Callable[[int, int], None]] = None,
                 control_image: Optional[np.ndarray] = None, control_strength: float = 1.0) -> SamplingResult:
        """Sample one image per row of ``cond``; ``uncond`` (same rows) is used when the sampler
        guides and ``guidance_scale > 1``. Row i's initial noise (and a stochastic sampler's step
        noise) comes from ``seeds[i]``; ``latents`` (B, C, h, w) replaces the initial noise.
        ``control_image`` (H, W, 3) uint8, for a ControlNet transformer: the edge map every image
        follows, times ``control_strength``."""
        start = time.perf_counter()
        gen_h, gen_w = self.generation_size(height, width, use_resolution_binning)
        batch = len(cond)
        seeds = list(seeds) if seeds is not None else image_seeds(batch)
        if len(seeds) != batch:
            raise InputError(f"{len(seeds)} seeds for {batch} images")
        latents = self._initial_latents(latents, seeds, gen_h, gen_w)
        step_noise = [np.random.default_rng([s, 1]) for s in seeds]  # a stream apart from the initial noise
        sampler = make_sampler(sampling_method, sampling_steps,
                               noise=lambda shape: np.stack([g.standard_normal(shape[1:]) for g in step_noise]))
        latents = latents * np.float32(sampler.init_noise_sigma)
        guided = sampler.classifier_free_guidance and guidance_scale > 1.0 and uncond is not None
        rows = cond.join([uncond, cond]) if guided else cond
        control = None if control_image is None else self.control_latents(control_image, control_strength, gen_h, gen_w)
        conditioning = rows.conditioning(gen_h, gen_w, control)
        channels = sampler.model_channels(self.transformer.config.in_channels)
        step_times = []
        for i, t in enumerate(tqdm(sampler.timesteps, desc=f"{sampling_method} {gen_h}x{gen_w}", disable=not progress,
                                   leave=False)):
            t0 = time.perf_counter()
            out = self.denoiser(latents, int(t), conditioning, guidance_scale if guided else None)
            latents = sampler.step(out[:, :channels], i, latents)
            step_times.append(time.perf_counter() - t0)
            if step_callback is not None:
                step_callback(i + 1, len(sampler.timesteps))
        images = self.decode(latents)
        images = bilinear_resize_and_crop(images, height, width) if (gen_h, gen_w) != (height, width) else images
        # the first step includes compilation; report the steady rate when there is one
        per_step = float(np.median(step_times[1:])) if len(step_times) > 1 else step_times[0]
        return SamplingResult(to_uint8(images), (gen_h, gen_w), per_step, time.perf_counter() - start)

    def control_latents(self, image: np.ndarray, strength: float, height: int, width: int) -> np.ndarray:
        """(1, C, h, w) VAE latents of a control image: resized and center-cropped to the sampling
        size (the same binning as the output), scaled to [-1, 1] times ``strength``, encoded (the
        posterior mean), scaled as the VAE's training latents."""
        if not self.controlled:
            raise InputError("a control image needs a ControlNet transformer (--controlnet)")
        pixels = np.asarray(resize_and_center_crop(Image.fromarray(image).convert("RGB"), height, width),
                            np.float32)
        pixels = (pixels / 127.5 - 1.0).transpose(2, 0, 1)[None] * np.float32(strength)
        mean = self.vae.encode(Tensor(pixels)).mean.asnumpy()
        return ((mean - self.vae.shift_factor) * self.vae.scaling_factor).astype(np.float32)

    def _initial_latents(self, latents: Optional[np.ndarray], seeds: Sequence[int], height: int, width: int):
        """The given initial latents, checked, or noise drawn from the seeds."""
        if latents is None:
            return self.initial_latents(seeds, height, width)
        want = (len(seeds), self.transformer.config.in_channels, height // self.vae_factor, width // self.vae_factor)
        if tuple(latents.shape) != want:
            raise InputError(f"initial latents must have shape {want} for {len(seeds)} image(s) at {height}x{width}, "
                             f"got {tuple(latents.shape)}")
        return latents.astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) sampler latents -> (B, 3, H, W) float32 images in about [-1, 1].

        Images larger in area than the VAE's native size (1024² for SDXL: every 1024-MS bucket
        fits) are decoded in blended tiles when ``tiled_decode`` is on, which bounds memory for
        2K/4K; smaller ones are decoded whole, exactly as diffusers does, as many at once as make up
        the latent area of one 1024² image (one image at a time would spend most of a small model's
        sampling time launching the decoder's kernels).
        """
        z = latents / np.float32(self.vae.scaling_factor) + np.float32(self.vae.shift_factor)
        native = self.vae.config.sample_size // self.vae_factor
        area = z.shape[2] * z.shape[3]
        tiled = self.tiled_decode and area > native * native
        rows = 1 if tiled else max(1, DECODE_LATENT_AREA // area)
        return np.concatenate([self.vae.decode(Tensor(z[i:i + rows]), tiled=tiled).asnumpy()
                               for i in range(0, len(z), rows)])


def split_batches(n: int, batch_size: int) -> List[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
