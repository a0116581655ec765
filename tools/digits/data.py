"""Captions of the miniature MNIST model (``models/pixart-digits``), in one place.

The data preparation writes them, the word-level tokenizer's vocabulary is built from
them, and the evaluation reads the intended digit back out of a prompt, so the three
cannot drift apart.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional

import numpy as np
from PIL import Image

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {n}: the numeral, {w}: the number word, {a}: "a" or "an" before the number (an eight, an 8)
CAPTION_TEMPLATES = (
    "{n}",
    "{w}",
    "a handwritten {w}",
    "a handwritten {n}",
    "the digit {n}",
    "the digit {w}",
    "number {w}",
    "the number {n}",
    "{a} {n}",
    "{a} {w}",
    "handwritten digit {w}",
    "a picture of the digit {w}",
    "a white {n} on a black background",
    "digit {n}, written by hand",
)

_WORDS = re.compile(r"[a-z]+|\d")


def caption(digit: int, template: str) -> str:
    """Fill one of ``CAPTION_TEMPLATES`` for ``digit`` (0-9)."""
    return template.format(n=digit, w=NUMBER_WORDS[digit], a="an" if digit == 8 else "a")


def all_captions() -> List[str]:
    """Every caption of every digit (the tokenizer's vocabulary must cover their words)."""
    return [caption(d, t) for d in range(10) for t in CAPTION_TEMPLATES]


def digit_in_prompt(prompt: str) -> Optional[int]:
    """The digit a prompt asks for: its only numeral or number word, else None.

    "a handwritten seven" -> 7, "the digit 3" -> 3, "7 or seven" -> 7; None when the
    prompt names no digit or two different ones ("3 and 5"), or a number above 9 ("12").
    """
    words = _WORDS.findall(prompt.lower())
    if re.search(r"\d\d", prompt):
        return None
    found = {int(w) if w.isdigit() else NUMBER_WORDS.index(w) for w in words if w.isdigit() or w in NUMBER_WORDS}
    return found.pop() if len(found) == 1 else None


def load_digit_images(label_file: str, image_dir: Optional[str] = None):
    """The images and true digits of a ``tools/digits/prepare.py`` label file.

    Returns ((N, 32, 32, 3) uint8, (N,) int64 digits), in label-file order; ``image_dir``
    defaults to the label file's folder.
    """
    image_dir = os.path.dirname(label_file) if image_dir is None else image_dir
    with open(label_file) as f:
        records = json.load(f)
    images = []
    for r in records:
        with Image.open(os.path.join(image_dir, r["path"])) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images), np.array([r["digit"] for r in records], np.int64)
