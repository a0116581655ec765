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
import sys

from pixart.cli import entry_point, parse_with_config
from pixart.cli.training import build_parser
from pixart.training.config import TrainConfig, model_config
from pixart.utils.hf_cache import apply_pretrained


@entry_point
def main(argv=None) -> int:
    args = parse_with_config(build_parser(__doc__), argv)
    apply_pretrained(args, argv)
    cfg = TrainConfig.from_namespace(args)
    cfg.check()

    from pixart.runtime import init_data_parallel, setup_device
    from pixart.training.trainer import Trainer

    setup_device(args.device, cfg.jit_level, cfg.max_device_memory)
    rank, world = init_data_parallel() if args.use_parallel else (0, 1)
    Trainer(cfg, model_config(cfg), rank, world).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
