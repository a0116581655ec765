#!/usr/bin/env python
"""Convert PixArt transformer weights to a MindSpore checkpoint, or back to diffusers.

    python tools/convert.py --source models/PixArt-Sigma-XL-2-1024-MS.pth --target models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py --source PixArt-Sigma-XL-2-1024-MS/transformer --target models/sigma-1024.ckpt
    python tools/convert.py --source output/checkpoints/step-1000.ckpt --target exported/transformer

Sources: an official .pth/.pt (bare state dict, or under `state_dict` / `state_dict_ema`;
--ema picks the EMA weights), a .safetensors file with official or diffusers names, a
diffusers `transformer/` folder, or (for the reverse direction) one of our .ckpt files.
No PyTorch is needed: .pth files are read with a restricted unpickler that runs no code.
"""
import argparse
import os
import sys
import time

import numpy as np

from pixart.cli import entry_point, non_negative_int, positive_int
from pixart.models.pixart_checkpoint import (
    add_null_caption, check_state_dict, diffusers_config, expected_shapes, infer_config, official_to_diffusers,
    read_source, save_mindspore_checkpoint)
from pixart.runtime import STORAGE_DTYPES
from pixart.utils.files import refuse_existing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="checkpoint file or diffusers transformer folder to read")
    p.add_argument("--target", required=True,
                   help="where to write: a .ckpt file, or a folder (diffusers layout) when --source is a .ckpt")
    p.add_argument("--ema", action="store_true", help="take `state_dict_ema` from a training checkpoint")
    p.add_argument("--num_heads", type=positive_int, default=None,
                   help="attention heads (not stored in official files; default: diffusers config or 16, as XL/2)")
    p.add_argument("--model_max_length", type=positive_int, default=None,
                   help="T5 tokens when the file has no y_embedding (diffusers files): 300 for Σ, 120 for α")
    p.add_argument("--input_size", type=positive_int, default=None,
                   help="latent size the model was trained at (image side / 8), when the file does not tell")
    p.add_argument("--pe_interpolation", type=float, default=None,
                   help="position-embedding interpolation (default: input_size / 64, as every official checkpoint)")
    p.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform"], default=None,
                   help="KV compression for parameter-free ave/uniform models (conv is detected from the weights)")
    p.add_argument("--kv_compress_layers", type=non_negative_int, nargs="*", default=None,
                   help="layers with ave/uniform KV compression (conv layers are detected from the weights)")
    p.add_argument("--fixed_size", action="store_true",
                   help="PixArt (square input_size only, as the Σ 256px checkpoint) rather than PixArtMS")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="fp32", help="dtype of the written weights")
    p.add_argument("--lora_path", nargs="+", action="extend", default=None,
                   help="LoRA adapter(s) to bake into the weights (PEFT folder or single .safetensors), e.g. to "
                        "write a standalone finetune or export one to diffusers")
    p.add_argument("--lora_scale", type=float, nargs="+", default=None,
                   help="strength of each --lora_path (one value for all, or one per adapter; default 1.0)")
    p.add_argument("--base_target", default=None,
                   help="ControlNet sources that hold their base model too (the official PixArt-XL-2-1024-ControlNet"
                        ".pth): where to write the base (default: the target's name with -base)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing target (never the source itself); default: refuse")
    return p.parse_args(argv)


def describe(config) -> str:
    extras = []
    if config.micro_condition:
        extras.append("micro-conditions")
    if config.kv_compress_layers:
        extras.append(f"KV compression ({config.kv_compress_sampling}, ratio {config.kv_compress_ratio}) on layers "
                      f"{list(config.kv_compress_layers)}")
    if config.qk_norm:
        extras.append("qk-norm")
    return (f"{'PixArtMS' if config.multi_scale else 'PixArt'}: depth {config.depth}, hidden {config.hidden_size}, "
            f"{config.num_heads} heads, patch {config.patch_size}, {config.in_channels}->{config.out_channels} "
            f"channels, caption {config.caption_channels}x{config.model_max_length} tokens, input {config.input_size}, "
            f"pe_interpolation {config.pe_interpolation}" + ("; " + ", ".join(extras) if extras else ""))


def bake_loras(sd, args) -> None:
    """Add the --lora_path adapters, at their --lora_scale, into the weights ``sd`` in place."""
    if not args.lora_path:
        return
    from pixart.models.lora import lora_deltas, read_lora, state_dict_slot_shapes
    from pixart.pipelines.loading import lora_scales

    shapes = state_dict_slot_shapes(sd)
    for path, scale in zip(args.lora_path, lora_scales(len(args.lora_path), args.lora_scale)):
        lora = read_lora(path)
        for name, delta in lora_deltas(shapes, lora, scale).items():
            sd[name + ".weight"] = (sd[name + ".weight"].astype(np.float64) + delta).astype(np.float32)
        print(f"merged LoRA {path} at scale {scale:g} into {len(lora.factors)} modules" +
              (f" ({lora.note})" if lora.note else ""))


def write_control(control, args) -> None:
    """The ControlNet branch of the source as its own .ckpt (at --target)."""
    from pixart.models.controlnet import control_block_count, save_control_checkpoint

    save_control_checkpoint(control, args.target, args.dtype)
    print(f"wrote {args.target}: ControlNet branch of {control_block_count(control)} blocks, {len(control)} tensors")


def dit_to_mindspore(sd, read_hints, args) -> None:
    """A DiT checkpoint (official or diffusers) -> our .ckpt with its architecture."""
    from pixart.models.dit import DiT
    from pixart.models.dit_checkpoint import infer_dit_config, official_dit, save_dit_checkpoint

    sd, hints = official_dit(sd, args.source)
    if "input_size" in read_hints:  # from the official pos_embed buffer
        hints.setdefault("input_size", read_hints["input_size"])
    if args.num_heads is not None:
        hints["num_heads"] = args.num_heads
    if args.input_size is not None:
        hints["input_size"] = args.input_size
    config = infer_dit_config(sd, **hints)
    print(f"DiT: depth {config.depth}, hidden {config.hidden_size}, {config.num_heads} heads, patch "
          f"{config.patch_size}, {config.num_classes} classes, input {config.input_size}")
    check_state_dict(sd, {n: tuple(p.shape) for n, p in DiT(config).parameters_and_names()}, args.source)
    save_dit_checkpoint(sd, config, args.target, dtype=args.dtype)
    print(f"wrote {args.target}: {len(sd)} tensors, {sum(int(np.prod(v.shape)) for v in sd.values()):,} parameters")


def to_mindspore(args) -> None:
    from pixart.models.controlnet import split_control
    from pixart.models.dit_checkpoint import is_dit_state_dict

    sd, hints = read_source(args.source, use_ema=args.ema)
    if is_dit_state_dict(sd):
        return dit_to_mindspore(sd, hints, args)
    sd, control = split_control(sd)
    if control:
        write_control(control, args)
        if not sd:
            return
        args.target = args.base_target or os.path.splitext(args.target)[0] + "-base.ckpt"
        refuse_existing(args.target, args.overwrite)
    bake_loras(sd, args)
    given = dict(hints)
    for key in ("model_max_length", "input_size", "pe_interpolation", "kv_compress_sampling", "kv_compress_layers"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    if args.fixed_size:
        given["multi_scale"] = False
    if args.num_heads is not None:
        given["num_heads"] = args.num_heads
    config = infer_config(sd, **given)
    print(describe(config))
    if add_null_caption(sd, config):
        print(f"note: the source has no y_embedding (null caption); initialised {config.model_max_length}x"
              f"{config.caption_channels} randomly as the official model does. It only matters for finetuning "
              f"with caption dropout.")
    check_state_dict(sd, expected_shapes(config), args.source)
    save_mindspore_checkpoint(sd, config, args.target, dtype=args.dtype)
    n = sum(int(np.prod(v.shape)) for k, v in sd.items() if k != "y_embedder.y_embedding")
    print(f"wrote {args.target}: {len(sd)} tensors, {n:,} parameters (+ y_embedding), {args.dtype}")


def to_diffusers(args) -> None:
    import json

    from pixart.errors import ConfigError
    from pixart.models.controlnet import split_control
    from pixart.utils.files import write_text_atomically
    from pixart.utils.safetensors_io import save_file

    sd, hints = read_source(args.source)
    _, control = split_control(sd)
    if control:  # a ControlNet branch: its official key layout, as safetensors
        if not args.target.endswith(".safetensors"):
            raise ConfigError("a ControlNet branch exports to a .safetensors file with the official keys; "
                              "give --target NAME.safetensors")
        save_file(control, args.target)
        print(f"wrote {args.target}: the ControlNet branch with the official controlnet.N.* keys")
        return
    bake_loras(sd, args)
    config = infer_config(sd, **hints)
    print(describe(config))
    dconfig = diffusers_config(config)
    tensors = official_to_diffusers(sd)
    os.makedirs(args.target, exist_ok=True)
    save_file(tensors, os.path.join(args.target, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    write_text_atomically(os.path.join(args.target, "config.json"), json.dumps(dconfig, indent=2))
    print(f"wrote {args.target}/ (config.json, diffusion_pytorch_model.safetensors): {len(tensors)} tensors")


def check_target(args, reverse: bool) -> None:
    """Refuse, before reading anything, a target that is the source or that would replace what
    the user has without --overwrite."""
    from pixart.errors import ConfigError
    from pixart.utils.files import same_file

    if same_file(args.source, args.target):
        raise ConfigError(f"--target {args.target} is the source itself; write the conversion somewhere else")
    if not reverse:
        if os.path.isdir(args.target):
            raise ConfigError(f"--target {args.target} is a folder; give the .ckpt file to write, e.g. "
                              f"{os.path.join(args.target, 'model.ckpt')}")
        refuse_existing(args.target, args.overwrite)
        return
    if args.target.endswith(".safetensors"):  # a ControlNet branch's export
        refuse_existing(args.target, args.overwrite)
        return
    if os.path.exists(args.target) and not os.path.isdir(args.target):
        raise ConfigError(f"--target {args.target} is a file; exporting to diffusers writes a folder "
                          f"(config.json and diffusion_pytorch_model.safetensors)")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        refuse_existing(os.path.join(args.target, name), args.overwrite)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    reverse = args.source.endswith(".ckpt") and not args.target.endswith(".ckpt")
    check_target(args, reverse)
    (to_diffusers if reverse else to_mindspore)(args)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
