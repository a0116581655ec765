#!/usr/bin/env python
"""Rate the miniature model's samples: do they show the digit asked for, and look like MNIST?

    python sample.py -c configs/inference/pixart-digits.yaml --prompt "a handwritten seven" "3" ... \\
        --output_path samples/digits
    python -m tools.digits.evaluate samples/digits
    python -m tools.digits.evaluate --retrain          # only (re)train the cached classifier

Every PNG in the folder that carries a ``prompt`` in its PNG text metadata (what sample.py
writes; grids and other files are skipped) and names exactly one digit ("seven", "7",
"the digit 7") is rated by a small CNN (``tools.digits.classifier``):

* prompt adherence: the share of images classified as the prompted digit, overall and per digit;
* Fréchet distance between the generated images and the real training digits in the
  classifier's 128-d penultimate features, beside the same distance for as many real
  digits (drawn from the training split and left out of the reference), for scale.

The classifier is trained on the held-out split (digits the generator never saw), its
accuracy measured on the training split, and it is cached in
``models/digits-classifier/`` so that evaluations are reproducible and fast.
Needs the digits of ``tools/digits/prepare.py`` (``--data_dir``).
"""
import argparse
import glob
import json
import os
import sys

import mindspore as ms
import numpy as np
from PIL import Image

from tools.digits.data import digit_in_prompt, load_digit_images
from tools.digits.bold import ink_coverage
from tools.digits.classifier import load_classifier, predict, save_classifier, train_classifier
from pixart.errors import ModelLoadError
from pixart.utils.fid import compute_statistics, frechet_distance


def read_generated(folder: str):
    """(images (N, H, W, 3) uint8, intended digits (N,), paths) of the rateable PNGs, and the
    number of PNGs skipped (no ``prompt`` metadata, or a prompt naming no single digit)."""
    images, digits, paths, skipped = [], [], [], 0
    for path in sorted(glob.glob(os.path.join(folder, "*.png"))):
        with Image.open(path) as im:
            digit = digit_in_prompt(im.text.get("prompt", "")) if hasattr(im, "text") else None
            if digit is None:
                skipped += 1
                continue
            images.append(np.asarray(im.convert("RGB")))
        digits.append(digit)
        paths.append(path)
    if images and len({im.shape for im in images}) > 1:
        raise ValueError(f"{folder}: the images differ in size; generate them at one size")
    return (np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)), np.array(digits, np.int64), \
        paths, skipped


def get_classifier(folder: str, data_dir: str, retrain: bool, seed: int):
    """The cached classifier, trained (on the held-out split) and cached first when missing or ``retrain``."""
    if not retrain and os.path.isfile(os.path.join(folder, "config.json")):
        return load_classifier(folder)
    heldout_images, heldout_digits = load_digit_images(os.path.join(data_dir, "heldout.json"))
    train_images, train_digits = load_digit_images(os.path.join(data_dir, "train.json"))
    model = train_classifier(heldout_images, heldout_digits, seed=seed)
    accuracy = float((predict(model, train_images)[0] == train_digits).mean())
    print(f"classifier accuracy on the {len(train_digits)} training-split digits it never saw: {accuracy:.2%}")
    save_classifier(model, folder, trained_on=f"{len(heldout_digits)} held-out digits (tools/digits/prepare.py)",
                    accuracy_on_train_split=round(accuracy, 4), seed=seed)
    print(f"saved the classifier to {folder}")
    return model


def adherence(predicted: np.ndarray, wanted: np.ndarray) -> dict:
    """Share of images classified as the prompted digit: overall, and per prompted digit (with counts)."""
    per_digit = {int(d): {"n": int((wanted == d).sum()), "adherence": float((predicted[wanted == d] == d).mean())}
                 for d in np.unique(wanted)}
    return {"n": int(len(wanted)), "adherence": float((predicted == wanted).mean()), "per_digit": per_digit}


def frechet_report(generated: np.ndarray, real: np.ndarray, seed: int = 0) -> dict:
    """Fréchet distances in feature space: generated vs real, and real vs real at the same sample size.

    ``n`` = len(generated) real feature vectors are drawn (seeded) as the real sample; the
    remaining real vectors are the reference of both distances, so the two are comparable
    (the Fréchet distance of a finite sample is biased upwards, more so for small ``n``).
    """
    n = len(generated)
    if n < 2 or n > len(real) // 2:
        raise ValueError(f"need 2 to {len(real) // 2} generated images for the Fréchet distance, got {n}")
    order = np.random.default_rng(seed).permutation(len(real))
    reference = compute_statistics(real[order[n:]])
    return {"generated_vs_real": frechet_distance(*compute_statistics(generated), *reference),
            "real_vs_real": frechet_distance(*compute_statistics(real[order[:n]]), *reference),
            "n": n, "reference_n": len(real) - n}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", help="folder of generated PNGs (sample.py output)")
    p.add_argument("--data_dir", default="data/digits", help="tools/digits/prepare.py output (default: data/digits)")
    p.add_argument("--classifier", default="models/digits-classifier",
                   help="cached classifier folder (default: models/digits-classifier)")
    p.add_argument("--retrain", action="store_true", help="train the classifier again and overwrite the cache")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and the real sample (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.folder and not args.retrain:
        sys.exit("error: give a folder of generated PNGs to rate (or --retrain to only train the classifier)")
    for name in ("train.json", "heldout.json"):
        if not os.path.isfile(os.path.join(args.data_dir, name)):
            sys.exit(f"error: {os.path.join(args.data_dir, name)} not found; run python -m tools.digits.prepare first")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    try:
        model = get_classifier(args.classifier, args.data_dir, args.retrain, args.seed)
    except ModelLoadError as e:
        sys.exit(f"error: {e} (rebuild it with --retrain)")
    if not args.folder:
        return 0
    if not os.path.isdir(args.folder):
        sys.exit(f"error: {args.folder} is not a folder")
    images, wanted, _, skipped = read_generated(args.folder)
    if not len(images):
        sys.exit(f"error: no PNG in {args.folder} has a prompt naming one digit ({skipped} skipped)")
    predicted, features = predict(model, images)
    report = adherence(predicted, wanted)
    report["skipped"] = skipped
    report["ink_coverage"] = ink_coverage(images)
    real_features = predict(model, load_digit_images(os.path.join(args.data_dir, "train.json"))[0])[1]
    try:
        report["frechet"] = frechet_report(features, real_features, args.seed)
    except ValueError as e:
        print(f"no Fréchet distance: {e}")

    print(f"{report['n']} images rated ({skipped} skipped: no prompt naming one digit)")
    with open(os.path.join(args.classifier, "config.json")) as f:
        ceiling = json.load(f).get("accuracy_on_train_split")
    print(f"prompt adherence: {report['adherence']:.1%}" +
          (f" (the classifier recognises {ceiling:.1%} of real digits it never saw)" if ceiling else ""))
    for d, r in report["per_digit"].items():
        print(f"  {d}: {r['adherence']:6.1%} of {r['n']}")
    print(f"ink coverage (pixels >= 128, the stroke-weight metric): {report['ink_coverage']:.3f}")
    if "frechet" in report:
        fr = report["frechet"]
        print(f"Fréchet distance (classifier features) to {fr['reference_n']} real digits: generated "
              f"{fr['generated_vs_real']:.2f}, real digits (same count, {fr['n']}) {fr['real_vs_real']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
