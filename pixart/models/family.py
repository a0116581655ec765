"""The two transformer families a checkpoint can hold, told apart and built through one door.

PixArt (``PixArtConfig``) is conditioned on T5 captions, DiT (``DiTConfig``) on class ids.
Scripts that take "any checkpoint" (sample.py, train.py) ask here which one it is rather than
trying one loader after the other.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

from pixart.models.dit import DiTConfig
from pixart.models.pixart import PixArtConfig

ModelConfig = Union[PixArtConfig, DiTConfig]


def is_class_conditional(config: ModelConfig) -> bool:
    return isinstance(config, DiTConfig)


def holds_dit(path: str) -> bool:
    """Whether the checkpoint at ``path`` (any source tools/convert.py reads) is a DiT; our .ckpt
    files say so in their config entry, diffusers folders in their config.json, other sources by
    their tensor names."""
    from pixart.models import dit_checkpoint
    from pixart.models.pixart_checkpoint import CONFIG_KEY, read_source, transformer_source
    from pixart.utils.mindspore_ckpt import read_ckpt

    if path.endswith(".ckpt") and os.path.isfile(path):
        keys = read_ckpt(path, select=lambda name: name in (CONFIG_KEY, dit_checkpoint.CONFIG_KEY))
        if keys:
            return dit_checkpoint.CONFIG_KEY in keys
    declared = _diffusers_family(transformer_source(path))
    if declared is not None:
        return declared == "dit"
    return dit_checkpoint.is_dit_state_dict(read_source(path)[0])


def _diffusers_family(folder: str) -> Optional[str]:
    """"pixart" or "dit" as a diffusers folder's config.json names its class (or, for the older
    ``Transformer2DModel`` of both, its norm); None where it does not say (or is no folder), so
    the caller reads the weights rather than every part of the model several times."""
    import json

    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    name, norm = config.get("_class_name"), config.get("norm_type")
    if name == "PixArtTransformer2DModel" or norm == "ada_norm_single":
        return "pixart"
    if name == "DiTTransformer2DModel" or norm == "ada_norm_zero":
        return "dit"
    return None


def read_model_config(path: str) -> ModelConfig:
    """The architecture a checkpoint holds, PixArt or DiT."""
    import json

    from pixart.models import dit_checkpoint
    from pixart.models.pixart_checkpoint import read_config
    from pixart.utils.mindspore_ckpt import read_ckpt

    if not holds_dit(path):
        return read_config(path)
    if path.endswith(".ckpt"):  # ours: the config entry alone, not the weights
        stored = read_ckpt(path, select=lambda name: name == dit_checkpoint.CONFIG_KEY)
        return DiTConfig.from_dict(json.loads(stored[dit_checkpoint.CONFIG_KEY]))
    sd, hints = dit_checkpoint.read_dit_source(path)
    return dit_checkpoint.infer_dit_config(sd, **hints)


def read_weights(path: str) -> Tuple[dict, dict]:
    """(official-named weights, hints) of either family's checkpoint; a PixArt's complete with the
    null caption that diffusers weights lack."""
    from pixart.models.dit_checkpoint import read_dit_source
    from pixart.models.pixart_checkpoint import add_null_caption, infer_config, read_source

    if holds_dit(path):
        return read_dit_source(path)
    sd, hints = read_source(path)
    add_null_caption(sd, infer_config(sd, **hints))
    return sd, hints


def build_transformer(config: ModelConfig, dtype=None, kernels=None):
    """A freshly initialised model of ``config``'s family."""
    import mindspore as ms

    from pixart.models.dit import DiT
    from pixart.models.pixart import build_model

    dtype = dtype or ms.float32
    return DiT(config, dtype=dtype, kernels=kernels) if is_class_conditional(config) else \
        build_model(config, dtype=dtype, kernels=kernels)
