"""On-disk cache of precomputed training features: VAE posteriors and T5 embeddings.

Running T5-XXL and the VAE on every step dominates finetuning cost, so they can be run
once over the dataset and stored, one ``.npz`` per (image, bucket size):

    <cache_dir>/<height>x<width>/<sha1 of the record path>.npz

An entry holds the VAE posterior of the image resized and cropped to that bucket size,
``latent_mean`` and ``latent_std`` (C, height/f, width/f) *before* the VAE scale factor,
so the trainer draws a fresh ``mean + std * noise`` every epoch as the reference does;
and for each caption field ("prompt", "sharegpt4v") the T5 output ``emb/<field>``
(L, D) with its attention mask ``mask/<field>`` (L,). Arrays are stored in the dtype
they are given (float16 halves the size) and read back unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import tempfile
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

from .buckets import Size

from pixart.errors import CacheError


@dataclasses.dataclass
class CacheEntry:
    """Precomputed features of one image at one bucket size.

    Attributes:
        latent_mean: (C, h, w) mean of the VAE posterior (unscaled).
        latent_std: (C, h, w) standard deviation of the VAE posterior.
        captions: caption field -> (embedding (L, D), mask (L,)); none in a class-conditional model's cache.
        control_mean: (C, h, w) posterior mean of the ControlNet control image, when training one.
    """
    latent_mean: np.ndarray
    latent_std: np.ndarray
    captions: Dict[str, Tuple[np.ndarray, np.ndarray]]
    control_mean: Optional[np.ndarray] = None


def cache_path(cache_dir: str, record_path: str, size: Size) -> str:
    """Where the entry for the label-file path ``record_path`` at ``size`` (h, w) lives.

    The path is normalised first so that ``a/./b.png`` and ``a\\b.png`` share an entry.
    """
    key = posixpath.normpath(record_path.replace("\\", "/"))
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return os.path.join(cache_dir, f"{size[0]}x{size[1]}", digest + ".npz")


def write_cache_entry(path: str, entry: CacheEntry) -> None:
    """Write ``entry`` to ``path`` atomically (a killed run never leaves half a file)."""
    _check_entry(entry, path)
    arrays = {"latent_mean": entry.latent_mean, "latent_std": entry.latent_std}
    if entry.control_mean is not None:
        arrays["control_mean"] = entry.control_mean
    for field, (emb, mask) in entry.captions.items():
        arrays[f"emb/{field}"] = emb
        arrays[f"mask/{field}"] = mask
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_cache_entry(path: str) -> CacheEntry:
    """Read the entry at ``path``; raises :class:`CacheError` naming the file on any problem."""
    if not os.path.isfile(path):
        raise CacheError(f"{path}: no such cache entry (run the feature-caching tool first)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CacheError(f"{path}: unreadable cache entry ({e}); delete it and re-run caching") from None
    missing = {"latent_mean", "latent_std"} - arrays.keys()
    if missing:
        raise CacheError(f"{path}: cache entry lacks {sorted(missing)}")
    captions = {}
    for name in arrays:
        if name.startswith("emb/"):
            field = name[len("emb/"):]
            if f"mask/{field}" not in arrays:
                raise CacheError(f"{path}: cache entry has emb/{field} but no mask/{field}")
            captions[field] = (arrays[name], arrays[f"mask/{field}"])
    entry = CacheEntry(arrays["latent_mean"], arrays["latent_std"], captions, arrays.get("control_mean"))
    _check_entry(entry, path)
    return entry


def _check_entry(entry: CacheEntry, path: str) -> None:
    if entry.latent_mean.ndim != 3 or entry.latent_mean.shape != entry.latent_std.shape:
        raise CacheError(f"{path}: latent_mean {entry.latent_mean.shape} and latent_std "
                         f"{entry.latent_std.shape} must be equal (C, h, w) shapes")
    if entry.control_mean is not None and entry.control_mean.shape != entry.latent_mean.shape:
        raise CacheError(f"{path}: control_mean {entry.control_mean.shape} must be shaped as latent_mean "
                         f"{entry.latent_mean.shape}")
    for field, (emb, mask) in entry.captions.items():
        if emb.ndim != 2 or mask.shape != emb.shape[:1]:
            raise CacheError(f"{path}: caption '{field}' needs emb (L, D) and mask (L,), "
                             f"got {emb.shape} and {mask.shape}")
