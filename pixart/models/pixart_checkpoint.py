"""PixArt transformer weights: official <-> diffusers names, architecture inference, and
loading/saving MindSpore checkpoints.

Official ``.pth`` keys are our parameter names. diffusers splits the fused projections
(``attn.qkv`` into ``to_q/to_k/to_v``, ``cross_attn.kv_linear`` into ``to_k/to_v``) and
renames the embedders; see ``_RENAMES``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from pixart.errors import ModelLoadError
from pixart.models.pixart import PixArtConfig
from pixart.utils.mindspore_ckpt import read_ckpt, write_ckpt

StateDict = Dict[str, np.ndarray]

# (official prefix, diffusers prefix); "#" stands for a block index.
_RENAMES = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("blocks.#.scale_shift_table", "transformer_blocks.#.scale_shift_table"),
    ("blocks.#.attn.proj.", "transformer_blocks.#.attn1.to_out.0."),
    ("blocks.#.cross_attn.q_linear.", "transformer_blocks.#.attn2.to_q."),
    ("blocks.#.cross_attn.proj.", "transformer_blocks.#.attn2.to_out.0."),
    ("blocks.#.mlp.fc1.", "transformer_blocks.#.ff.net.0.proj."),
    ("blocks.#.mlp.fc2.", "transformer_blocks.#.ff.net.2."),
]
# fused official projection -> the diffusers projections it is stacked from (on dim 0)
_FUSED = [
    ("blocks.#.attn.qkv.", ["transformer_blocks.#.attn1.to_q.", "transformer_blocks.#.attn1.to_k.",
                            "transformer_blocks.#.attn1.to_v."]),
    ("blocks.#.cross_attn.kv_linear.", ["transformer_blocks.#.attn2.to_k.", "transformer_blocks.#.attn2.to_v."]),
]
# the official position-embedding buffer: recomputed for every size, so never loaded; read_source
# turns it into the trained latent size it tells
_POS_EMBED = "pos_embed"


def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace("\\#", r"(\d+)"))


def _substitute(prefix: str, index: Optional[str]) -> str:
    return prefix.replace("#", index) if index is not None else prefix


def _match(key: str, prefix: str) -> Optional[Tuple[Optional[str], str]]:
    """If ``key`` starts with ``prefix`` (with # a block index), return (index, rest of the key)."""
    m = _pattern(prefix).match(key)
    if not m:
        return None
    return (m.group(1) if m.groups() else None), key[m.end():]


def diffusers_modules(slot: str) -> List[str]:
    """The diffusers module(s) one of our layers computes: ``x_embedder.proj`` -> ``pos_embed.proj``;
    a fused projection gives the modules it stacks, in row order (``blocks.3.attn.qkv`` ->
    ``transformer_blocks.3.attn1.to_q``, ``.to_k``, ``.to_v``). KeyError for a layer diffusers
    does not have."""
    key = slot + "."
    for official, parts in _FUSED:
        m = _match(key, official)
        if m and not m[1]:
            return [_substitute(part, m[0])[:-1] for part in parts]
    for official, diffusers in _RENAMES:
        m = _match(key, official) if official.endswith(".") else None
        if m and not m[1]:
            return [_substitute(diffusers, m[0])[:-1]]
    raise KeyError(slot)


def is_diffusers_state_dict(sd: StateDict) -> bool:
    return any(k.startswith(("transformer_blocks.", "adaln_single.", "pos_embed.proj.")) for k in sd)


def diffusers_to_official(sd: StateDict) -> StateDict:
    """Rename a diffusers ``PixArtTransformer2DModel`` state dict to official keys."""
    out: StateDict = {}
    consumed = set()
    for official, parts in _FUSED:
        for key in sd:
            m = _match(key, parts[0])
            if not m:
                continue
            idx, suffix = m
            names = [_substitute(p, idx) + suffix for p in parts]
            missing = [n for n in names if n not in sd]
            if missing:
                raise ModelLoadError(f"diffusers checkpoint has {key} but not {', '.join(missing)}")
            out[_substitute(official, idx) + suffix] = np.concatenate([sd[n] for n in names], axis=0)
            consumed.update(names)
    for key, value in sd.items():
        if key in consumed:
            continue
        for official, diffusers in _RENAMES:
            m = _match(key, diffusers)
            if m:
                out[_substitute(official, m[0]) + m[1]] = value
                break
        else:
            out[key] = value  # left as is: the key check reports it as unexpected
    return out


def official_to_diffusers(sd: StateDict) -> StateDict:
    """Rename official keys to diffusers ones (for writing a diffusers ``transformer/`` folder)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == "y_embedder.y_embedding":
            continue
        for official, parts in _FUSED:
            m = _match(key, official)
            if m:
                for i, chunk in enumerate(np.split(value, len(parts), axis=0)):
                    out[_substitute(parts[i], m[0]) + m[1]] = chunk
                break
        else:
            for official, diffusers in _RENAMES:
                m = _match(key, official)
                if m:
                    out[_substitute(diffusers, m[0]) + m[1]] = value
                    break
            else:
                raise ModelLoadError(f"{key} has no diffusers equivalent (diffusers' PixArtTransformer2DModel "
                                     f"supports neither KV compression nor qk-norm)")
    return out


def _require(sd: StateDict, key: str, what: str) -> np.ndarray:
    if key not in sd:
        raise ModelLoadError(f"not a PixArt transformer checkpoint: {key} ({what}) is missing")
    return sd[key]


def infer_config(sd: StateDict, num_heads: Optional[int] = None, **given) -> PixArtConfig:
    """The architecture from official-named tensors. What tensors cannot tell comes from ``given``
    (``num_heads``, default 16 as XL/2, and ``input_size``/``pe_interpolation``/``model_max_length``/
    ``kv_compress_sampling``/``multi_scale`` when known from elsewhere)."""
    patch_w = _require(sd, "x_embedder.proj.weight", "the patch embedding")
    if patch_w.ndim != 4:
        raise ModelLoadError(f"x_embedder.proj.weight should be (hidden, channels, p, p), got {patch_w.shape}")
    hidden, in_ch, p, _ = patch_w.shape
    depth = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.", k)})
    if depth == 0:
        raise ModelLoadError("not a PixArt transformer checkpoint: no blocks.N.* tensors")
    out_ch = _require(sd, "final_layer.linear.weight", "the output projection").shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ModelLoadError(f"final_layer.linear gives {out_ch} output channels for {in_ch} input channels")
    fc1 = _require(sd, "blocks.0.mlp.fc1.weight", "the first MLP")
    kv_layers = sorted(int(k.split(".")[1]) for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.sr\.weight", k))
    cfg = dict(
        patch_size=int(p), in_channels=int(in_ch), hidden_size=int(hidden), depth=depth, num_heads=num_heads or 16,
        mlp_ratio=fc1.shape[0] / hidden,
        caption_channels=int(_require(sd, "y_embedder.y_proj.fc1.weight", "the caption projection").shape[1]),
        learn_sigma=out_ch == 2 * in_ch,
        micro_condition="csize_embedder.mlp.0.weight" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
    )
    if kv_layers:  # conv compression has weights; ave/uniform layers can only come from ``given``
        cfg["kv_compress_layers"] = kv_layers
        cfg["kv_compress_ratio"] = int(sd[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1])
        cfg["kv_compress_sampling"] = "conv"
    if "y_embedder.y_embedding" in sd:
        cfg["model_max_length"] = int(sd["y_embedder.y_embedding"].shape[0])
    for key, value in given.items():  # tensors win over hints wherever they tell
        if value is not None:
            cfg.setdefault(key, value)
    cfg.setdefault("input_size", 128)
    # every official checkpoint has pe_interpolation = latent size / 64 (0.5 at 256px ... 4 at 2K)
    cfg.setdefault("pe_interpolation", cfg["input_size"] / 64)
    try:
        return PixArtConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"inconsistent architecture: {e}") from None


def expected_shapes(config: PixArtConfig) -> Dict[str, tuple]:
    """Parameter name -> shape of the model ``config`` describes (built without weights)."""
    from pixart.models.pixart import build_model  # MindSpore import only where needed
    return {name: tuple(p.shape) for name, p in build_model(config, initialize=False).parameters_and_names()}


def check_state_dict(sd: StateDict, expected: Dict[str, tuple], source: str = "checkpoint",
                     optional: Iterable[str] = ()) -> None:
    """Raise ``ModelLoadError`` naming every missing, unexpected or mis-shaped tensor.

    ``expected``: name -> shape of what the model has (``expected_shapes``, or a model's own
    parameters with its adapters attached); names in ``optional`` (declared adapter keys) may
    be absent from ``sd`` but, when present, are checked like the others.
    """
    optional = set(optional)
    missing = sorted(set(expected) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: {tuple(sd[k].shape)} in the file, {expected[k]} in the model"
                        for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ModelLoadError(f"{source} does not match the model it is loaded into:\n  " + "\n  ".join(problems))


def load_weights(model, sd: StateDict, source: str = "checkpoint", optional: Iterable[str] = ()) -> None:
    """Copy ``sd`` into ``model``'s parameters of the same names, after checking that every name
    and shape fits (``check_state_dict``; ``optional`` names may be absent). The one way weights
    get into a model."""
    import mindspore as ms

    params = dict(model.parameters_and_names())
    check_state_dict(sd, {name: tuple(p.shape) for name, p in params.items()}, source, optional)
    for name, value in sd.items():
        params[name].set_data(ms.Tensor(np.asarray(value, np.float32)))


# ----------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------

def read_source(path: str, use_ema: bool = False) -> Tuple[StateDict, dict]:
    """Read any supported transformer source as (official-named weights, hints for
    ``infer_config``); the official ``pos_embed`` buffer becomes the hint ``input_size``.
    Sources: official ``.pth``/``.pt`` (bare, or under ``state_dict`` / ``state_dict_ema``),
    ``.safetensors`` (official or diffusers names), a diffusers ``transformer/`` folder (or the
    pipeline folder holding it), or one of our MindSpore ``.ckpt`` files. Diffusers weights have no
    ``y_embedder.y_embedding``: ``add_null_caption`` makes one once the architecture is known."""
    from pixart.utils import safetensors_io, torch_pickle

    hints: dict = {}
    path = transformer_source(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelLoadError(f"{path}: a diffusers transformer folder (or a pipeline folder with "
                                 f"model_index.json and transformer/) needs config.json, not found")
        with open(cfg_path) as f:
            dcfg = json.load(f)
        sd = safetensors_io.load_sharded_folder(path, "diffusion_pytorch_model")
        hints = {**diffusers_config_hints(dcfg), **pipeline_hints(os.path.dirname(os.path.abspath(path)))}
    elif not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file or folder")
    elif path.endswith(".safetensors"):
        sd = safetensors_io.load_file(path)
    elif path.endswith((".pth", ".pt", ".bin")):
        sd = _unwrap_torch_checkpoint(torch_pickle.load(path), path, use_ema)
    elif path.endswith(".ckpt"):
        sd, config = read_mindspore_checkpoint(path)
        hints = config.to_dict() if config else {}
    else:
        raise ModelLoadError(f"{path}: unknown checkpoint type (expected .pth, .pt, .safetensors, .ckpt or a "
                             f"diffusers transformer folder)")
    sd = control_names_official(sd)
    if is_diffusers_state_dict(sd) and not any(".norm1.emb.class_embedder." in k for k in sd):  # DiT: its own map
        sd = diffusers_to_official(sd)
    if _POS_EMBED in sd:  # official buffer (1, tokens, hidden) at the trained square size
        patch = sd["x_embedder.proj.weight"].shape[-1] if "x_embedder.proj.weight" in sd else 1
        hints["input_size"] = int(round(np.sqrt(sd.pop(_POS_EMBED).shape[1]))) * int(patch)
    return sd, hints


def transformer_source(path: str) -> str:
    """The transformer inside a diffusers pipeline folder (``model_index.json`` beside
    ``transformer/``, as ``save_pretrained`` and the Hugging Face hub lay it out); any other path
    as it is."""
    inner = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(inner):
        return inner
    return path


# T5 tokens of the diffusers pipelines (their ``max_sequence_length`` default), which the transformer
# folder cannot tell: diffusers drops ``y_embedding``, the tensor whose length says it
_PIPELINE_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def pipeline_hints(folder: str) -> dict:
    """What the pipeline's ``model_index.json`` in ``folder`` says of its transformer: the
    caption length; nothing when ``folder`` is no PixArt pipeline."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}
    tokens = _PIPELINE_TOKENS.get(index.get("_class_name")) if isinstance(index, dict) else None
    return {"model_max_length": tokens} if tokens else {}


def add_null_caption(sd: StateDict, config: PixArtConfig) -> bool:
    """Give weights read from diffusers (which drops it) the null caption ``y_embedder.y_embedding``,
    initialised as the official model does (seed 0, so every load gives the same). It only matters
    for finetuning with caption dropout; inference encodes its negative prompt instead. Returns
    whether it was missing."""
    from pixart.models.pixart import random_null_caption

    if "y_embedder.y_embedding" in sd:
        return False
    sd["y_embedder.y_embedding"] = random_null_caption(np.random.default_rng(0), config.model_max_length,
                                                       config.caption_channels)
    return True


_ADAPTER_BLOCK = re.compile(r"controlnet_blocks\.(\d+)\.(transformer_block\.)?(.*)$")


def control_names_official(sd: StateDict) -> StateDict:
    """ControlNet checkpoints with official names: the official ``PixArt-XL-2-1024-ControlNet.pth``
    holds the base under ``base_model.`` (stripped here) and the branch under ``controlnet.`` (kept);
    diffusers' research-project adapter (``controlnet_blocks.{i}.before_proj`` /
    ``.transformer_block.<diffusers block names>`` / ``.after_proj``) becomes ``controlnet.{i}.*``.
    Other state dicts pass unchanged."""
    if not any(k.startswith(("base_model.", "controlnet_blocks.")) for k in sd):
        return sd
    out: StateDict = {}
    blocks: Dict[str, StateDict] = {}
    for key, value in sd.items():
        m = _ADAPTER_BLOCK.match(key)
        if key.startswith("base_model."):
            out[key[len("base_model."):]] = value
        elif m and m.group(2):  # a diffusers block inside the adapter: renamed below, block by block
            blocks.setdefault(m.group(1), {})[f"transformer_blocks.{m.group(1)}.{m.group(3)}"] = value
        elif m:
            out[f"controlnet.{m.group(1)}.{m.group(3)}"] = value
        else:
            out[key] = value
    for index, block in blocks.items():
        for key, value in diffusers_to_official(block).items():
            out[key.replace(f"blocks.{index}.", f"controlnet.{index}.copied_block.", 1)] = value
    return out


def _unwrap_torch_checkpoint(obj, path: str, use_ema: bool) -> StateDict:
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    key = "state_dict_ema" if use_ema else "state_dict"
    if use_ema and key not in obj:
        raise ModelLoadError(f"{path}: --ema asked for state_dict_ema, which this checkpoint does not have "
                             f"(it has: {', '.join(map(str, obj))})")
    sd = obj.get(key, obj)
    tensors = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}
    if not tensors:
        raise ModelLoadError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    return tensors


def diffusers_config_hints(dcfg: dict) -> dict:
    """What a diffusers ``PixArtTransformer2DModel`` config.json says that tensors cannot."""
    hints = {"num_heads": dcfg.get("num_attention_heads")}
    if dcfg.get("sample_size"):
        hints["input_size"] = int(dcfg["sample_size"])
    if dcfg.get("interpolation_scale") is not None:
        hints["pe_interpolation"] = float(dcfg["interpolation_scale"])
    elif dcfg.get("sample_size"):
        hints["pe_interpolation"] = float(max(int(dcfg["sample_size"]) // 64, 1))
    return hints


def diffusers_config(config: PixArtConfig) -> dict:
    """config.json for a diffusers ``PixArtTransformer2DModel`` with this architecture."""
    if config.kv_compress_layers or config.qk_norm:
        raise ModelLoadError("diffusers' PixArtTransformer2DModel supports neither KV compression nor qk-norm")
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_condition,
        "caption_channels": config.caption_channels,
        "dropout": 0.0,
        "upcast_attention": False,
        "attention_type": "default",
    }


# ----------------------------------------------------------------------------------------
# MindSpore checkpoints
# ----------------------------------------------------------------------------------------

CONFIG_KEY = PixArtConfig.checkpoint_key


def save_mindspore_checkpoint(sd: StateDict, config, path: str, dtype: str = "fp32") -> None:
    """Write tensors (cast to ``dtype``) plus the architecture (JSON under the config's
    ``checkpoint_key``: ``pixart_config`` or ``dit_config``) as a ``.ckpt``, atomically: nothing
    appears at ``path`` unless the whole file was written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_ckpt(path, {**sd, config.checkpoint_key: json.dumps(config.to_dict())}, float_dtype=dtype)


def read_mindspore_checkpoint(path: str) -> Tuple[StateDict, Optional[PixArtConfig]]:
    """(float32 tensors, stored architecture or None) from a ``.ckpt``."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such checkpoint")
    raw = read_ckpt(path)
    config = PixArtConfig.from_dict(json.loads(raw[CONFIG_KEY])) if isinstance(raw.get(CONFIG_KEY), str) else None
    sd = {k: v.astype(np.float32, copy=False) for k, v in raw.items() if isinstance(v, np.ndarray)}
    return sd, config


def read_config(path: str) -> PixArtConfig:
    """The architecture of a checkpoint without loading its weights when it is one of our
    ``.ckpt`` files (other sources are read whole)."""
    if path.endswith(".ckpt") and os.path.isfile(path):
        raw = read_ckpt(path, select=lambda name: name == CONFIG_KEY)
        if isinstance(raw.get(CONFIG_KEY), str):
            return PixArtConfig.from_dict(json.loads(raw[CONFIG_KEY]))
    sd, hints = read_source(path)
    return infer_config(sd, **hints)


def load_pixart(path: str, dtype=None, kernels=None, **overrides):
    """Build the transformer a checkpoint describes and load its weights.

    ``path`` is anything ``read_source`` accepts (normally a converted ``.ckpt``; a diffusers
    folder is converted in memory, nothing written). The
    architecture comes from the file; ``overrides`` (e.g. ``input_size``, ``pe_interpolation``,
    ``multi_scale``) replace what an inference config knows better. Returns (model, config).
    """
    import mindspore as ms
    from pixart.models.pixart import build_model

    sd, hints = read_source(path)
    hints.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_config(sd, **hints)
    add_null_caption(sd, config)
    model = build_model(config, dtype=dtype or ms.float32, kernels=kernels, initialize=False)
    load_weights(model, sd, path)
    model.set_train(False)
    return model, config
