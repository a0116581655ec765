"""DiT weights: the official checkpoints (``DiT-XL-2-256x256.pt``, a bare state dict) and diffusers'
``DiTTransformer2DModel`` folders, the architecture read from the tensors, our .ckpt files."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import numpy as np

from pixart.errors import ModelLoadError
from pixart.models.dit import DiTConfig

StateDict = Dict[str, np.ndarray]
CONFIG_KEY = DiTConfig.checkpoint_key

# diffusers module -> official module ("#" a block index). diffusers repeats the timestep and class
# embedders in every block's AdaLayerNormZero; they are one module in DiT (block 0's is read).
_RENAMES = [
    ("pos_embed.proj.", "x_embedder.proj."),
    ("transformer_blocks.#.norm1.linear.", "blocks.#.adaLN_modulation.1."),
    ("transformer_blocks.#.attn1.to_out.0.", "blocks.#.attn.proj."),
    ("transformer_blocks.#.ff.net.0.proj.", "blocks.#.mlp.fc1."),
    ("transformer_blocks.#.ff.net.2.", "blocks.#.mlp.fc2."),
    ("proj_out_1.", "final_layer.adaLN_modulation.1."),
    ("proj_out_2.", "final_layer.linear."),
]
_EMBEDDERS = [
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.", "y_embedder.embedding_table."),
]
_REPEATED_EMBEDDER = re.compile(r"transformer_blocks\.\d+\.norm1\.emb\.")


def is_dit_state_dict(sd: StateDict) -> bool:
    """Official or diffusers DiT weights (a class table instead of PixArt's caption projection)."""
    return any(k.startswith("y_embedder.embedding_table") or ".norm1.emb.class_embedder." in k for k in sd)


def diffusers_to_official(sd: StateDict) -> StateDict:
    if not any(k.startswith("transformer_blocks.") for k in sd):
        return sd
    out: StateDict = {}
    for key, value in sd.items():
        for diffusers, official in _EMBEDDERS:
            if key.startswith(diffusers):
                out[official + key[len(diffusers):]] = value
                break
        else:
            if _REPEATED_EMBEDDER.match(key):
                continue
            m = re.match(r"transformer_blocks\.(\d+)\.attn1\.to_q\.(.+)$", key)
            if m:
                stem = f"transformer_blocks.{m.group(1)}.attn1.to_"
                out[f"blocks.{m.group(1)}.attn.qkv.{m.group(2)}"] = np.concatenate(
                    [sd[f"{stem}{x}.{m.group(2)}"] for x in "qkv"], axis=0)
                continue
            if re.match(r"transformer_blocks\.\d+\.attn1\.to_[kv]\.", key):
                continue
            for diffusers, official in _RENAMES:
                pattern = re.escape(diffusers).replace("\\#", r"(\d+)")
                m = re.match(pattern, key)
                if m:
                    prefix = official.replace("#", m.group(1)) if m.groups() else official
                    out[prefix + key[m.end():]] = value
                    break
            else:
                out[key] = value  # left as is: the key check reports it
    return out


def infer_dit_config(sd: StateDict, **given) -> DiTConfig:
    """The architecture from official-named tensors; ``given`` (num_heads, input_size, norm_eps,
    class_dropout_prob) for what they cannot tell."""
    def need(key):
        if key not in sd:
            raise ModelLoadError(f"not a DiT checkpoint: {key} is missing")
        return sd[key]

    hidden, in_ch, p, _ = need("x_embedder.proj.weight").shape
    depth = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.", k)})
    table = need("y_embedder.embedding_table.weight")
    out_ch = need("final_layer.linear.weight").shape[0] // (p * p)
    cfg = dict(patch_size=int(p), in_channels=int(in_ch), hidden_size=int(hidden), depth=depth,
               num_classes=int(table.shape[0]) - 1, learn_sigma=out_ch == 2 * in_ch,
               mlp_ratio=need("blocks.0.mlp.fc1.weight").shape[0] / hidden)
    for key, value in given.items():
        if value is not None:
            cfg.setdefault(key, value)
    cfg.setdefault("num_heads", 16)
    try:
        return DiTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"inconsistent DiT architecture: {e}") from None


def diffusers_hints(dcfg: dict) -> dict:
    """What a diffusers ``DiTTransformer2DModel`` config.json says that tensors cannot. Its timestep
    embedding divides the frequency exponent by 127, not the official 128 (``freq_shift`` 1): kept,
    so the converted model gives diffusers' outputs."""
    return {"num_heads": dcfg.get("num_attention_heads"), "input_size": dcfg.get("sample_size"),
            "norm_eps": dcfg.get("norm_eps"), "freq_shift": 1}


def read_dit_source(path: str) -> Tuple[StateDict, dict]:
    """(official-named weights without pos_embed, hints) from an official .pt/.pth, a
    diffusers ``transformer/`` folder (or its pipeline folder), a .safetensors file or one of our
    DiT .ckpt files."""
    from pixart.models.pixart_checkpoint import read_source, transformer_source
    from pixart.utils.mindspore_ckpt import read_ckpt

    path = transformer_source(path)  # official_dit reads the folder's config.json
    if path.endswith(".ckpt") and os.path.isfile(path):
        raw = read_ckpt(path)
        stored = json.loads(raw[CONFIG_KEY]) if isinstance(raw.get(CONFIG_KEY), str) else {}
        sd = {k: v.astype(np.float32, copy=False) for k, v in raw.items() if isinstance(v, np.ndarray)}
        return sd, stored
    sd, read_hints = read_source(path)
    sd, hints = official_dit(sd, path)
    if "input_size" in read_hints:  # from the official pos_embed buffer, which read_source turns into a hint
        hints.setdefault("input_size", read_hints["input_size"])
    return sd, hints


def official_dit(sd: StateDict, source: str) -> Tuple[StateDict, dict]:
    """A DiT state dict as ``read_source`` gives it -> (official names, pos_embed dropped; hints from
    the pos_embed buffer or a diffusers folder's config.json)."""
    hints: dict = {}
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        with open(os.path.join(source, "config.json")) as f:
            hints = diffusers_hints(json.load(f))
    sd = diffusers_to_official(sd)
    if "pos_embed" in sd:
        patch = sd["x_embedder.proj.weight"].shape[-1]
        hints["input_size"] = int(round(np.sqrt(sd.pop("pos_embed").shape[1]))) * int(patch)
    return sd, {k: v for k, v in hints.items() if v is not None}


def load_dit(path: str, dtype=None, kernels=None, **overrides):
    """The DiT a checkpoint describes, weights loaded; (model, config)."""
    import mindspore as ms

    from pixart.models.dit import DiT
    from pixart.models.pixart_checkpoint import load_weights

    sd, hints = read_dit_source(path)
    hints.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_dit_config(sd, **hints)
    model = DiT(config, dtype=dtype or ms.float32, kernels=kernels, initialize=False)
    load_weights(model, sd, path)
    model.set_train(False)
    return model, config


def save_dit_checkpoint(sd: StateDict, config: DiTConfig, path: str, dtype: str = "fp32") -> None:
    from pixart.models.pixart_checkpoint import save_mindspore_checkpoint

    save_mindspore_checkpoint(sd, config, path, dtype=dtype)
