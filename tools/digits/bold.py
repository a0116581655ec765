#!/usr/bin/env python
"""Bold MNIST digits: the training set of the bundled style LoRA (``models/digits-bold-lora``).

    python -m tools.digits.prepare                  # data/digits/ (the plain digits)
    python -m tools.digits.bold                     # -> data/digits-bold/

Every digit of ``data/digits`` with its strokes thickened: a grey-level dilation by a 3x3
square (each pixel takes the brightest of its neighbours), which widens a stroke by about two
pixels. Same captions, same splits, same label-file layout, so ``train.py`` and
``tools.digits.evaluate`` read it as they read the plain set. The bundled digits model never
saw a bold digit; the LoRA trained on this set teaches it the style.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from tools.digits.prepare import SPLITS


def dilate(image: np.ndarray, radius: int = 1) -> np.ndarray:
    """Grey-level dilation of (H, W[, C]) by a (2r+1)^2 square: each pixel the maximum of its window."""
    padded = np.pad(image, [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2))
    h, w = image.shape[:2]
    windows = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    return np.max(windows, axis=0)


def ink_coverage(images: np.ndarray, threshold: int = 128) -> float:
    """The style metric: the mean fraction of pixels at least ``threshold`` bright (of (N, H, W[, C]) uint8)."""
    grey = images.mean(axis=-1) if images.ndim == 4 else images
    return float((grey >= threshold).mean())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source_dir", default="data/digits", help="the plain digits (tools.digits.prepare)")
    p.add_argument("--output_dir", default="data/digits-bold", help="where to write (default: data/digits-bold)")
    p.add_argument("--radius", type=int, default=1, help="dilation radius in pixels (default 1: a 3x3 square)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.radius < 1:
        sys.exit("error: --radius must be at least 1")
    for split in SPLITS:
        label_file = os.path.join(args.source_dir, f"{split}.json")
        if not os.path.isfile(label_file):
            sys.exit(f"error: {label_file} not found; run python -m tools.digits.prepare first")
        with open(label_file) as f:
            records = json.load(f)
        plain, bold = [], []
        for record in tqdm(records, desc=f"thickening {split}", unit="img"):
            image = np.asarray(Image.open(os.path.join(args.source_dir, record["path"])).convert("RGB"))
            thick = dilate(image, args.radius)
            os.makedirs(os.path.dirname(os.path.join(args.output_dir, record["path"])), exist_ok=True)
            Image.fromarray(thick).save(os.path.join(args.output_dir, record["path"]))
            plain.append(image)
            bold.append(thick)
        with open(os.path.join(args.output_dir, f"{split}.json"), "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
        print(f"{split}: {len(records)} images; ink coverage {ink_coverage(np.stack(plain)):.3f} plain, "
              f"{ink_coverage(np.stack(bold)):.3f} bold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
