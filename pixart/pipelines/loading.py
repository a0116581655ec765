"""Loading the four parts of a text-to-image model from where users keep them.

A model is a transformer checkpoint (anything ``tools/convert.py`` reads, normally its
``.ckpt``), a diffusers VAE folder, a T5 encoder folder and its tokenizer folder (a class-
conditional DiT has the first two alone). These
functions check that each is there (with a message saying where to get it), load each part in
the precision its device can run, and check the parts fit together before any compilation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

from pixart.errors import ConfigError

WHERE_TO_GET = {
    "checkpoint": "Download the transformer .pth of your model (e.g. PixArt-Sigma-XL-2-1024-MS.pth from the "
                  "PixArt-alpha/PixArt-Sigma repository on Hugging Face) into models/ and convert it:\n"
                  "  python tools/convert.py --source models/PixArt-Sigma-XL-2-1024-MS.pth "
                  "--target models/PixArt-Sigma-XL-2-1024-MS.ckpt",
    "vae_root": "Download your model's VAE folder to models/vae: PixArt-Σ's is the vae/ folder of "
                "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (SDXL VAE); PixArt-α and DiT use the SD VAE "
                "(stabilityai/sd-vae-ft-ema).",
    "text_encoder_root": "Download the text_encoder/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                         "(T5-v1.1-XXL encoder) to models/text_encoder.",
    "tokenizer_root": "Download the tokenizer/ folder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                      "to models/tokenizer.",
}
TEXT_PARTS = ("text_encoder_root", "tokenizer_root")


@dataclasses.dataclass
class ModelPaths:
    """Where the four parts are; the names are the command-line flags."""
    checkpoint: Optional[str]
    vae_root: Optional[str]
    text_encoder_root: Optional[str]
    tokenizer_root: Optional[str]
    extra_paths: Sequence[str] = ()   # LoRA adapters, a ControlNet

    @property
    def class_conditional(self) -> bool:
        """Whether the checkpoint (which must exist) is a class-conditional DiT, which needs no T5."""
        from pixart.models.family import holds_dit
        return holds_dit(self.checkpoint)

    def check(self) -> None:
        """ConfigError naming the first part that is not set or not there, and where to get it."""
        for key, help_text in WHERE_TO_GET.items():
            if key in TEXT_PARTS and self.class_conditional:
                continue
            path = getattr(self, key)
            if not path:
                raise ConfigError(f"--{key} is not set (nor in the config).\n{help_text}")
            if not os.path.exists(path):
                raise ConfigError(f"--{key}: {path!r} does not exist.\n{help_text}")
        for path in self.extra_paths:
            if not os.path.exists(path):
                raise ConfigError(f"{path!r} does not exist (--lora_path / --controlnet)")


def check_parts_fit(paths: ModelPaths, model_max_length: Optional[int] = None, input_size: Optional[int] = None):
    """Check, from their configs alone and before any model is loaded or compiled, that the parts
    are one model: the T5 width is the transformer's caption width, the VAE's latent channels
    its input channels, and a requested token length the one it was trained with (300 Σ,
    120 α). Returns (the token length (None for a DiT), the image ``SizeLimits``); ConfigError naming the
    mismatch otherwise. ``input_size`` overrides the checkpoint's trained latent size."""
    from pixart.models.autoencoder_kl import AutoencoderKLConfig
    from pixart.models.family import is_class_conditional, read_model_config
    from pixart.pipelines.text_to_image import SizeLimits
    from pixart.utils.hf_folder import read_folder_config

    config = read_model_config(paths.checkpoint)
    text = not is_class_conditional(config)
    d_model = read_folder_config(paths.text_encoder_root, "T5 text encoder").get("d_model") if text else None
    if text and d_model != config.caption_channels:
        raise ConfigError(f"the transformer {paths.checkpoint} reads {config.caption_channels}-channel caption "
                          f"features, but the text encoder {paths.text_encoder_root} makes {d_model}-channel ones: "
                          f"they are not parts of one model")
    vae = read_folder_config(paths.vae_root, "VAE")
    latent_channels = vae.get("latent_channels", 4)
    if latent_channels != config.in_channels:
        raise ConfigError(f"the transformer {paths.checkpoint} denoises {config.in_channels}-channel latents, but "
                          f"the VAE {paths.vae_root} has {latent_channels}: they are not parts of one model")
    if text and model_max_length and model_max_length != config.model_max_length:
        raise ConfigError(f"--model_max_length {model_max_length} does not match the checkpoint's "
                          f"{config.model_max_length} tokens")
    try:
        vae_factor = AutoencoderKLConfig.from_hf(vae).downsample_factor
    except (TypeError, ValueError) as e:
        raise ConfigError(f"VAE: {paths.vae_root}/config.json: {e}") from None
    max_length = config.model_max_length if text else None
    return max_length, SizeLimits.for_model(input_size or config.input_size, config.patch_size, vae_factor)


def load_text_encoder(folder: str, device: str, dtype):
    """The T5 encoder of ``folder`` in ``dtype``, or fp32 on CPU (no half-precision CPU matmuls)."""
    from pixart.models.t5 import T5Encoder
    from pixart.runtime import text_encoder_dtype

    return T5Encoder.from_pretrained(folder, dtype=text_encoder_dtype(device, dtype))


def lora_scales(count: int, scales: Optional[Sequence[float]]) -> List[float]:
    """One scale per adapter from --lora_scale: none given means 1.0 each, one value applies to all."""
    if not scales:
        return [1.0] * count
    if len(scales) == 1:
        return [float(scales[0])] * count
    if len(scales) != count:
        raise ConfigError(f"--lora_scale: {len(scales)} values for {count} --lora_path adapter(s); give one "
                          f"value for all or one per adapter")
    return [float(s) for s in scales]


def merge_loras(model, paths: Sequence[str], scales: Optional[Sequence[float]] = None):
    """Read the LoRA adapters at ``paths`` and merge them into ``model``'s weights at their scales;
    the ``LoraMerger`` (None without adapters) changes the scales later, exactly."""
    from pixart.models.lora import LoraMerger, read_lora

    if scales and not paths:
        raise ConfigError("--lora_scale without --lora_path")
    if not paths:
        return None
    per_adapter = lora_scales(len(paths), scales)
    loras = [read_lora(path) for path in paths]
    for lora in loras:
        if lora.note:
            print(f"note: {lora.note}")
    merger = LoraMerger(model, loras)
    merger.set_scales(per_adapter)
    return merger
