#!/usr/bin/env bash
# LoRA finetune of PixArt-Σ 1024px on 8 devices (one node) with msrun data parallelism.
# The global batch is batch_size x 8; every rank reads the same label file and takes its slice.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate    # msrun starts the python on PATH
msrun --worker_num=8 --local_worker_num=8 --log_dir=output/my-lora-1024/msrun_log --join=True \
    train.py -c configs/train/pixart-sigma-1024-MS-lora.yaml \
    --json_path data/labels.json --image_dir data/images --feature_cache data/cache \
    --use_parallel True --batch_size 2 --lr 1e-4 \
    --output_path output/my-lora-1024     # add --resume latest to continue (the checkpoint must be on every node)
