"""Edge maps for ControlNet control images: Canny's detector in NumPy.

PixArt-δ's ControlNet was trained on HED edges, whose detector needs network weights that
cannot be fetched here; Canny's needs none. Grey image -> Gaussian blur (sigma 1.4) -> Sobel
gradients -> thinning to the local maxima along the gradient direction -> double threshold ->
hysteresis (weak edges survive where connected to a strong one). White edges on black.
"""
from __future__ import annotations

import numpy as np


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation with edge padding, (H, W) float64."""
    kh, kw = kernel.shape
    padded = np.pad(image, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    out = np.zeros_like(image, dtype=np.float64)
    h, w = image.shape
    for dy in range(kh):
        for dx in range(kw):
            out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(round(2 * sigma)))
    x = np.arange(-radius, radius + 1)
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    g /= g.sum()
    return np.outer(g, g)


def canny(image: np.ndarray, low: float = 0.1, high: float = 0.2, sigma: float = 1.4) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W, 3) uint8 edge map, 255 on edges.

    ``low``/``high``: hysteresis thresholds as fractions of the largest gradient magnitude."""
    grey = image.astype(np.float64)
    if grey.ndim == 3:
        grey = grey[..., :3] @ np.array([0.299, 0.587, 0.114])
    grey = _convolve(grey, _gaussian_kernel(sigma))
    gx = _convolve(grey, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64))
    gy = _convolve(grey, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float64))
    magnitude = np.hypot(gx, gy)
    peak = magnitude.max()
    if peak == 0:
        return np.zeros(grey.shape + (3,), np.uint8)
    # thinning: keep a pixel only if it is at least its two neighbours across the edge
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    neighbours = {0: ((0, 1), (0, -1)), 45: ((1, 1), (-1, -1)), 90: ((1, 0), (-1, 0)), 135: ((1, -1), (-1, 1))}
    sector = (np.round(angle / 45.0) * 45 % 180).astype(int)
    thin = np.zeros_like(magnitude)
    for direction, ((ay, ax), (by, bx)) in neighbours.items():
        a = padded[1 + ay:1 + ay + h, 1 + ax:1 + ax + w]
        b = padded[1 + by:1 + by + h, 1 + bx:1 + bx + w]
        keep = (sector == direction) & (magnitude >= a) & (magnitude >= b)
        thin[keep] = magnitude[keep]
    strong = thin >= high * peak
    weak = (thin >= low * peak) & ~strong
    # hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes
    edges = strong.copy()
    while True:
        grown = np.pad(edges, 1)
        reach = np.zeros_like(edges)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                reach |= grown[dy:dy + h, dx:dx + w]
        added = reach & weak & ~edges
        if not added.any():
            break
        edges |= added
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)
