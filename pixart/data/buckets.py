"""Aspect-ratio buckets: which (height, width) an image is trained or generated at.

PixArt trains multi-scale models on 40 buckets of roughly equal area whose height/width
ratios span 0.25..4.0, and bins inference resolutions to 33 of them (the ``_TEST``
tables). The official tables ship beside this module in ``aspect_ratio_buckets.json``
(keys ``ASPECT_RATIO_{256,512,1024,2048,2880}`` and their ``_TEST`` variants; inside a
table, keys are height/width ratios as strings and values ``[height, width]`` pixels).

Base sizes without an official table (the miniature models train at 32 or 64 px) get a
table scaled from an official one; see :func:`bucket_table` for the rule.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, Tuple

from PIL import Image

Size = Tuple[int, int]  # (height, width) in pixels
BucketTable = Dict[str, Size]  # ratio key (height/width as a string) -> size

OFFICIAL_BASE_SIZES = (256, 512, 1024, 2048, 2880)
# VAE downsample factor (8) x transformer patch size (2): every image side must be a
# multiple of this for the latent to split into whole patches.
DEFAULT_DIVISOR = 16

_TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aspect_ratio_buckets.json")


@functools.lru_cache(maxsize=None)
def _official_tables() -> Dict[str, BucketTable]:
    with open(_TABLE_FILE, encoding="utf-8") as f:
        raw = json.load(f)
    return {name: {k: (int(h), int(w)) for k, (h, w) in table.items()} for name, table in raw.items()}


def official_table(base_size: int, test: bool = False) -> BucketTable:
    """The official table ``ASPECT_RATIO_<base_size>[_TEST]``, ordered by ratio."""
    if base_size not in OFFICIAL_BASE_SIZES:
        raise ValueError(f"no official bucket table for base size {base_size}; "
                         f"official sizes are {OFFICIAL_BASE_SIZES}")
    name = f"ASPECT_RATIO_{base_size}" + ("_TEST" if test else "")
    return dict(_official_tables()[name])


def bucket_table(base_size: int, test: bool = False, divisor: int = DEFAULT_DIVISOR) -> BucketTable:
    """Bucket table for images of about ``base_size`` x ``base_size`` pixels.

    Official base sizes return the official table unchanged. Any other base size gets a
    table scaled from the official table nearest in log scale (ties go to the larger,
    which loses less when scaled down):

    1. every official (h, w) is multiplied by ``base_size / official_base`` and each side
       rounded to the nearest multiple of ``divisor`` (at least ``divisor``);
    2. the entry is keyed by the ratio of its *rounded* size, ``str(round(h / w, 2))``,
       so that nearest-ratio lookups see the shape the image will really have;
    3. entries that end up with the same key (rounding makes neighbours coincide, most
       at small sizes) are merged, keeping the size whose area is closest to base_size².

    The result is ordered by ratio, has strictly increasing h/w and at most as many
    entries as the source table.

    Args:
        base_size: the square training / generation resolution in pixels.
        test: use the 33-bucket ``_TEST`` tables meant for inference binning.
        divisor: every side of a scaled table is a multiple of it (VAE factor x patch).
    Returns:
        {ratio key: (height, width)}, ascending by ratio.
    """
    if base_size <= 0 or divisor <= 0:
        raise ValueError(f"base_size and divisor must be positive, got {base_size} and {divisor}")
    if base_size in OFFICIAL_BASE_SIZES:
        return official_table(base_size, test)
    source = min(sorted(OFFICIAL_BASE_SIZES, reverse=True),
                 key=lambda s: abs(math.log(s / base_size)))
    scale = base_size / source

    def to_multiple(x: float) -> int:
        return max(divisor, int(round(x / divisor)) * divisor)

    table: BucketTable = {}
    for h, w in official_table(source, test).values():
        size = (to_multiple(h * scale), to_multiple(w * scale))
        key = str(round(size[0] / size[1], 2))
        kept = table.get(key)
        if kept is None or abs(size[0] * size[1] - base_size ** 2) < abs(kept[0] * kept[1] - base_size ** 2):
            table[key] = size
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


def nearest_bucket(height: int, width: int, table: BucketTable) -> Tuple[str, Size]:
    """The bucket whose ratio key is nearest to height / width (first one on a tie).

    Same rule as the official ``get_closest_ratio``: distance is ``|float(key) - h/w|``.
    Returns (ratio key, (bucket height, bucket width)).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return key, table[key]


def ratio_range(table: BucketTable) -> Tuple[float, float]:
    """(smallest, largest) ratio key of a table."""
    ratios = [float(k) for k in table]
    return min(ratios), max(ratios)


def resolution_binning(height: int, width: int, base_size: int, divisor: int = DEFAULT_DIVISOR) -> Size:
    """Size to generate at for a requested height x width: the nearest ``_TEST`` bucket.

    Generate at the returned size, then :func:`resize_and_center_crop` the result back to
    the requested size (what diffusers does with ``use_resolution_binning``).
    """
    return nearest_bucket(height, width, bucket_table(base_size, test=True, divisor=divisor))[1]


def resize_and_center_crop(image: Image.Image, height: int, width: int,
                           resample: int = Image.BICUBIC) -> Image.Image:
    """Resize ``image`` to cover height x width keeping its aspect ratio, then center crop.

    The side that binds is scaled to exactly its target; the other is scaled by the same
    factor, rounded and never below its target, so the crop always fits. The crop offset
    is ``(excess) // 2`` on each axis, as in diffusers.

    Returns:
        A PIL image of size (width, height), in the input's mode.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    src_w, src_h = image.size
    if src_w <= 0 or src_h <= 0:
        raise ValueError(f"cannot resize an empty image ({src_w}x{src_h})")
    # Compare height/src_h with width/src_w in integers to pick the binding side exactly.
    if height * src_w >= width * src_h:
        new_h, new_w = height, max(width, round(src_w * height / src_h))
    else:
        new_h, new_w = max(height, round(src_h * width / src_w)), width
    if (new_w, new_h) != (src_w, src_h):
        image = image.resize((new_w, new_h), resample=resample)
    if (new_w, new_h) == (width, height):
        return image
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image.crop((left, top, left + width, top + height))
