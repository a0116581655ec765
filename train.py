#!/usr/bin/env python
"""Finetune (or train) a PixArt transformer with multi-resolution bucketing, in graph mode.

    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/
    msrun --worker_num=8 --local_worker_num=8 --log_dir=log train.py -c configs/train/pixart-sigma-512-MS.yaml \\
        --json_path labels.json --image_dir images/ --use_parallel True

Every flag can be set in the YAML config (same name, no dashes); the command line wins.
msrun starts the `python` found on PATH: activate the virtual environment first
(`source .venv/bin/activate`).

One optimizer step = forward, IDDPM loss, backward, gradient all-reduce (data parallel),
clipping and the optimizer update, compiled into one graph per bucket shape.
"""
import argparse
import json
import os
import sys

from pixart.utils.config import fail, parse_with_config, str2bool


def json_dict(text):
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file with defaults for any of the flags below")
    g = p.add_argument_group("data")
    g.add_argument("--json_path", help="label file: a list of {path, prompt, sharegpt4v, height, width, ratio}")
    g.add_argument("--image_dir", help="folder the label paths are relative to")
    g.add_argument("--feature_cache", help="train from precomputed VAE/T5 features (tools/cache_features.py); "
                                           "T5 and the VAE are then not loaded")
    g.add_argument("--image_size", type=int, default=512, help="base resolution in pixels (bucket table)")
    g.add_argument("--multi_scale", type=str2bool, default=True,
                   help="aspect-ratio buckets; False trains everything at image_size x image_size")
    g.add_argument("--real_prompt_ratio", type=float, default=0.5,
                   help="probability of the original `prompt` over the `sharegpt4v` caption")
    g.add_argument("--num_workers", type=int, default=2, help="image loading threads")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="initial weights (.ckpt from tools/convert.py or a training checkpoint); "
                                        "the architecture comes from it")
    g.add_argument("--model", default="PixArt-Sigma-XL-2-512-MS",
                   help="architecture preset when training from scratch (no --checkpoint)")
    g.add_argument("--model_config", type=json_dict, default=None,
                   help='architecture overrides as JSON, e.g. \'{"depth": 4, "hidden_size": 192}\'')
    g.add_argument("--vae_root", help="diffusers AutoencoderKL folder")
    g.add_argument("--text_encoder_root", help="T5 encoder folder")
    g.add_argument("--tokenizer_root", help="T5 tokenizer folder")
    g.add_argument("--replace_null_caption", type=str2bool, default=False,
                   help="set y_embedding (the dropped-caption embedding) to T5(\"\"), as the official finetuning")
    g.add_argument("--recompute", type=str2bool, default=False, help="activation checkpointing per block")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="compute dtype; weights and optimizer stay fp32 (CPU: fp32 only)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=["came", "adamw"], default="came")
    g.add_argument("--lr", type=float, default=2e-5, help="learning rate after warm-up")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--betas", type=float, nargs="+", default=None,
                   help="CAME: 3 values (0.9 0.999 0.9999); AdamW: 2 (0.9 0.999)")
    g.add_argument("--eps", type=float, nargs="+", default=None, help="CAME: 2 values (1e-30 1e-16); AdamW: 1")
    g.add_argument("--warmup_steps", type=int, default=1000, help="linear warm-up, then constant")
    g.add_argument("--auto_lr", choices=["none", "sqrt", "linear"], default="none",
                   help="scale lr by the global batch: sqrt(batch/256) or batch/256")
    g.add_argument("--grad_clip", type=float, default=0.01, help="max global gradient norm (0 = off)")
    g.add_argument("--grad_accumulation", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA of the weights (0 = off)")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="caption dropout for classifier-free guidance")
    g.add_argument("--loss_scale", type=float, default=65536.0, help="initial dynamic loss scale (fp16 only)")
    g = p.add_argument_group("schedule")
    g.add_argument("--batch_size", type=int, default=4, help="images per device per micro-batch")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="output/train", help="checkpoints, logs and validation samples")
    g.add_argument("--ckpt_every", type=int, default=1000, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints to keep (0 = all)")
    g.add_argument("--resume", help="'latest' or a checkpoint folder: continue exactly where it stopped")
    g.add_argument("--log_every", type=int, default=10, help="log metrics every N steps")
    g.add_argument("--tensorboard", type=str2bool, default=True, help="also write TensorBoard event files")
    g.add_argument("--validation_every", type=int, default=0, help="sample validation images every N steps (0 = off)")
    g.add_argument("--validation_prompts", nargs="*", default=[], help="prompts for validation images")
    g.add_argument("--validation_steps", type=int, default=20, help="DPM-Solver steps for validation images")
    g = p.add_argument_group("runtime")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel over msrun workers")
    g.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    g.add_argument("--device", choices=["CPU", "GPU", "Ascend"], default=None)
    g.add_argument("--progress", type=str2bool, default=True, help="progress bar")
    return p


def setup_mindspore(args):
    """Device and execution mode; with --use_parallel, the communication group. Returns (rank, world)."""
    import mindspore as ms

    if args.device:
        ms.set_device(args.device)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the train step compiles itself with ms.jit in graph mode
    if not getattr(args, "use_parallel", False):
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    world = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    return get_rank(), world


def model_config(args):
    """The architecture: from --checkpoint if given, else the --model preset, with --model_config on top."""
    from pixart.models.pixart import PRESETS, PixArtConfig
    from pixart.models.pixart_checkpoint import read_config

    if args.checkpoint:
        config = read_config(args.checkpoint)
    elif args.model in PRESETS:
        config = PRESETS[args.model]
    else:
        fail(f"--model {args.model!r} is not a preset ({', '.join(PRESETS)}); give --checkpoint instead")
    overrides = dict(args.model_config or {})
    overrides["class_dropout_prob"] = args.class_dropout_prob
    try:
        return PixArtConfig.from_dict({**config.to_dict(), **overrides})
    except (TypeError, ValueError) as e:
        fail(f"--model_config: {e}")


def check_args(args):
    if not args.json_path or not args.image_dir:
        fail("--json_path and --image_dir are required (a label file and the image folder)")
    if not args.feature_cache:
        missing = [k for k in ("vae_root", "text_encoder_root", "tokenizer_root") if not getattr(args, k)]
        if missing:
            fail(f"training from images needs {', '.join('--' + k for k in missing)} "
                 f"(or --feature_cache from tools/cache_features.py)")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint!r} does not exist; convert the official weights with tools/convert.py")
    for key in ("batch_size", "grad_accumulation", "epochs"):
        if getattr(args, key) < 1:
            fail(f"--{key} must be at least 1")


def main(argv=None) -> int:
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    rank, world = setup_mindspore(args)
    from pixart.training.trainer import Trainer

    trainer = Trainer(args, model_config(args), rank, world)
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
