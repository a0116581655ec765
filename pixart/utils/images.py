"""Saving generated images: PNG text metadata, never overwriting, grids."""
from __future__ import annotations

import os
import re
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pixart.errors import OutputError
from pixart.utils.files import place_new, temporary_sibling


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "image"


def next_index(folder: str) -> int:
    """One past the highest ``NNNNN-`` prefix in ``folder``, so earlier outputs are never overwritten."""
    used = [int(m.group(1)) for name in os.listdir(folder) if (m := re.match(r"(\d{5})-", name))]
    return max(used, default=-1) + 1


def generation_metadata(prompt: str, negative_prompt: str, seed: int, sampling_method: str, sampling_steps: int,
                        guidance_scale: float, checkpoint: str, size: Tuple[int, int],
                        generated_size: Tuple[int, int], loras: str = "") -> Dict[str, str]:
    """What a generated PNG records so that it can be made again: the settings under their
    command-line names, the checkpoint's file name, the asked size and the size sampled at
    (the resolution bucket), both as "HxW", and the merged LoRA adapters ("name@scale, ...")."""
    meta = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": str(seed),
            "sampling_method": sampling_method, "sampling_steps": str(sampling_steps),
            "guidance_scale": str(guidance_scale), "checkpoint": os.path.basename(checkpoint),
            "size": f"{size[0]}x{size[1]}", "generated_size": f"{generated_size[0]}x{generated_size[1]}"}
    if loras:
        meta["loras"] = loras
    return meta


def save_png(image: np.ndarray, folder: str, stem: str, metadata: Dict[str, str]) -> str:
    """Write (H, W, 3) uint8 as ``folder/NNNNN-stem.png`` with ``metadata`` as PNG text chunks.

    The PNG is written completely under a temporary name, then linked into place without ever
    replacing a file: a concurrent writer that took the same index moves this one on, and a
    failure (full disk) leaves no partial PNG. OutputError says why a PNG could not be written."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    try:
        os.makedirs(folder, exist_ok=True)
        index = next_index(folder)
        with temporary_sibling(os.path.join(folder, f"{index:05d}-{stem}.png")) as tmp:
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
            while True:
                path = os.path.join(folder, f"{index:05d}-{stem}.png")
                try:
                    place_new(tmp, path)
                    return path
                except FileExistsError:
                    index += 1
    except OSError as e:
        raise OutputError(f"cannot save an image in {folder!r}: {e.strerror or e}") from None


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
