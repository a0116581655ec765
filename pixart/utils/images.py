"""Saving generated images: PNG text metadata, never overwriting, grids."""
from __future__ import annotations

import os
import re
from typing import Dict, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "image"


def next_index(folder: str) -> int:
    """One past the highest ``NNNNN-`` prefix in ``folder``, so earlier outputs are never overwritten."""
    used = [int(m.group(1)) for name in os.listdir(folder) if (m := re.match(r"(\d{5})-", name))]
    return max(used, default=-1) + 1


def save_png(image: np.ndarray, folder: str, stem: str, metadata: Dict[str, str]) -> str:
    """Write (H, W, 3) uint8 as ``folder/NNNNN-stem.png`` with ``metadata`` as PNG text chunks.
    The file is created exclusively: a concurrent writer that picked the same index moves on."""
    os.makedirs(folder, exist_ok=True)
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    index = next_index(folder)
    while True:
        path = os.path.join(folder, f"{index:05d}-{stem}.png")
        try:
            with open(path, "xb") as f:
                Image.fromarray(image).save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            index += 1


def make_grid(images: Sequence[np.ndarray], columns: int = 0) -> np.ndarray:
    """Tile (H, W, 3) images of one size into a grid, ``columns`` wide (default: about square)."""
    n = len(images)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    h, w, c = images[0].shape
    grid = np.full((rows * h, columns * w, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid


def read_png_metadata(path: str) -> Dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)
