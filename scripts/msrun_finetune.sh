#!/usr/bin/env bash
# Full finetune of PixArt-Σ 512px on 8 devices (one node) with msrun data parallelism: every
# weight trains (CAME, as the official recipe), checkpoints hold model.ckpt / ema.ckpt.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate    # msrun starts the python on PATH
msrun --worker_num=8 --local_worker_num=8 --log_dir=output/my-finetune/msrun_log --join=True \
    train.py -c configs/train/pixart-sigma-512-MS.yaml \
    --json_path data/labels.json --image_dir data/images --feature_cache data/cache \
    --use_parallel True --batch_size 32 \
    --output_path output/my-finetune      # add --resume latest to continue (the checkpoint must be on every node)
