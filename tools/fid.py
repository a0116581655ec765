#!/usr/bin/env python
"""Fréchet Inception Distance from precomputed Inception features or statistics.

    python tools/fid.py generated_features.npy reference_stats.npz
    python tools/fid.py --save_stats reference_stats.npz reference_features.npy

Each input is one of:

* ``.npy``: an (N, D) array of features, one row per image (2048-d Inception-v3 pool
  features for FID);
* ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D): statistics, in the format pytorch-fid
  writes with ``--save-stats`` (so published reference statistics can be used);
* ``.npz`` with ``features`` (N, D).

This project does not run Inception-v3 itself: compute the features with the reference
network (pt_inception-2015-12-05 weights, e.g. ``python -m pytorch_fid --save-stats
FOLDER stats.npz`` in a PyTorch environment) and compare them here. The distance itself
is ``pixart.utils.fid.frechet_distance``. For the miniature MNIST model use
``tools/digits/evaluate.py``, which has its own feature network.
"""
import argparse
import os
import sys

import numpy as np

from pixart.utils.fid import compute_statistics, frechet_distance


def load_statistics(path: str):
    """(mu, sigma, number of images or None) from a features or statistics file (see the module docstring)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".npy"):
        features = np.load(path)
    elif path.endswith(".npz"):
        with np.load(path) as data:
            if "mu" in data and "sigma" in data:
                return data["mu"], data["sigma"], None
            if "features" not in data:
                raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', or 'features'; found {', '.join(data)}")
            features = data["features"]
    else:
        raise ValueError(f"{path}: expected a .npy features file or a .npz statistics/features file")
    if features.ndim != 2:
        raise ValueError(f"{path}: features must be (N, D), got shape {features.shape}")
    mu, sigma = compute_statistics(features)
    return mu, sigma, len(features)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="two features/statistics files to compare (one with --save_stats)")
    p.add_argument("--save_stats", metavar="NPZ", help="write the statistics (mu, sigma) of the one input here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    wanted = 1 if args.save_stats else 2
    if len(args.inputs) != wanted:
        sys.exit(f"error: expected {wanted} input file(s), got {len(args.inputs)}")
    try:
        stats = [load_statistics(path) for path in args.inputs]
        if args.save_stats:
            mu, sigma, _ = stats[0]
            np.savez(args.save_stats, mu=mu, sigma=sigma)
            print(f"saved statistics of {mu.shape[0]}-d features to {args.save_stats}")
            return 0
        (mu1, sigma1, n1), (mu2, sigma2, n2) = stats
        distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    except ValueError as e:
        sys.exit(f"error: {e}")
    counts = ", ".join(f"{path}: {n} images" for path, (_, _, n) in zip(args.inputs, stats) if n is not None)
    print(f"FID {distance:.3f}" + (f" ({counts})" if counts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
