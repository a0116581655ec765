#!/usr/bin/env bash
# LoRA finetune of PixArt-Σ 512px on one device. Copy, then edit the paths and the config.
#   labels.json: a list of {"path", "prompt", "height", "width"} records, paths relative to images/
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
# Optional and recommended for T5-XXL: compute the T5 and VAE features once, then train without them
#   python tools/cache_features.py -c configs/train/pixart-sigma-512-MS-lora.yaml \
#       --json_path data/labels.json --image_dir data/images --feature_cache data/cache
python train.py -c configs/train/pixart-sigma-512-MS-lora.yaml \
    --json_path data/labels.json --image_dir data/images \
    --lora_rank 16 --lr 1e-4 --max_steps 2000 \
    --output_path output/my-lora          # add --resume latest to continue a stopped run
# The adapter: output/my-lora/checkpoints/step-00002000/adapter (a PEFT folder)
#   python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --lora_path output/my-lora/checkpoints/step-00002000/adapter \
#       --prompt "..."
