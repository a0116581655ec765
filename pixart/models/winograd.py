"""Winograd F(4x4, 3x3): the CPU path of the VAE's large 3x3, stride-1, padding-1 convolutions.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), with the
interpolation points 0, +-1, +-2, infinity. Each 4x4 output tile comes from a 6x6 input tile:

    Y = A^T [ (G g G^T) * (B^T d B) ] A      (g the 3x3 kernel, * elementwise)

and summed over input channels the elementwise product becomes 36 matmuls (O, C) @ (C, T),
T the number of tiles: 2.25 multiplications per output instead of im2col's 9. On the AVX2 CPU
MindSpore 2.10's wide im2col matmul (O, 9C) @ (9C, HW) runs at 38-96 GFLOP/s; with this, a 512px
SDXL-VAE decode took 32 s instead of 76 (diffusers: 32-34 s; see the README's benchmarks).
The error is about 1e-5 of the output's magnitude, 2-3x im2col's.

The image runs in bands of output rows through one compiled graph per (C, O, band shape), all
bands padded to the same height: a compiled graph keeps its buffers for its life, so bands
bound that memory, and a fixed band shape keeps the number of graphs (and the first-call cost
of each one's fresh memory) small. ``zero_pad`` serves both CPU convolution paths.
"""
from __future__ import annotations

import functools

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops.primitive import constexpr

from pixart.runtime import jit

def _function_marker():
    return 0


@constexpr(check=False)
def _arrives_as_none(value):
    return value is None


def in_compiled_graph() -> bool:
    """True while MindSpore compiles a graph, False eagerly. A ``constexpr`` runs at compile time
    and receives non-constant arguments, a function among them, as None (MindSpore's own private
    ``_run_in_jit`` tests the same way)."""
    return _arrives_as_none(_function_marker)


BAND_PIXELS = 1 << 14  # output pixels of one band (1024 tiles): 32 rows of a 512px image
TILE = 4               # output tile side

_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)
# The 2-D transforms act on a tile flattened row-major: (B^T d B).flat = kron(B^T, B^T) @ d.flat.
_INPUT_TRANSFORM = Tensor(np.kron(_BT, _BT).astype(np.float32))    # (36, 36)
_KERNEL_TRANSFORM = Tensor(np.kron(_G, _G).astype(np.float32))     # (36, 9)
_OUTPUT_TRANSFORM = Tensor(np.kron(_AT, _AT).astype(np.float32))   # (16, 36)


def applies(x_shape, kernel_size: int, stride: int, padding: int) -> bool:
    """Whether ``winograd_conv3x3`` computes this convolution: 3x3, stride 1, padding 1,
    H and W multiples of the tile."""
    h, w = x_shape[-2:]
    return kernel_size == 3 and stride == 1 and padding == 1 and h % TILE == 0 and w % TILE == 0


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(B, C, H, W), weight (O, C, 3, 3), bias (O,) -> (B, O, H, W): torch's ``conv2d`` with
    padding 1, for H and W multiples of 4. Runs eagerly, calling the compiled band graph."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    rows = min(h, max(TILE, BAND_PIXELS // w // TILE * TILE))
    bands = -(-h // rows)
    # one zero-pad: the 1-pixel border, plus the rows that make the last band full height
    x = zero_pad(x.astype(ms.float32), 1, 1, 1, 1 + bands * rows - h)
    kernels = ops.matmul(_KERNEL_TRANSFORM, weight.astype(ms.float32).reshape(o * c, 9).T).reshape(36, o, c)
    bias = bias.astype(ms.float32).reshape(1, o, 1, 1)
    images = []
    for i in range(b):
        image = x[i:i + 1]
        out = [_compiled_band()(image[:, :, r:r + rows + 2], kernels, bias) for r in range(0, bands * rows, rows)]
        images.append(ops.concat(out, axis=2) if bands > 1 else out[0])
    y = ops.concat(images, axis=0) if b > 1 else images[0]
    return (y[:, :, :h] if bands * rows > h else y).astype(weight.dtype)


def zero_pad(x, left: int, right: int, top: int, bottom: int):
    """Zero-pad the last two axes of (B, C, H, W) by concatenation.

    Not ``ops.pad``: in MindSpore 2.10 on CPU, a compiled graph that back-propagates
    through ``ops.pad`` hangs (one kernel spinning) after a few calls, which stops VAE training.
    """
    b, c, h, w = x.shape
    x = _concat_zeros(x, 3, (b, c, h, left), (b, c, h, right))
    return _concat_zeros(x, 2, (b, c, top, w + left + right), (b, c, bottom, w + left + right))


def _concat_zeros(x, axis: int, before_shape, after_shape):
    parts = [x]
    if before_shape[axis]:
        parts = [ops.zeros(before_shape, x.dtype)] + parts
    if after_shape[axis]:
        parts = parts + [ops.zeros(after_shape, x.dtype)]
    return ops.concat(parts, axis=axis) if len(parts) > 1 else x


def _band(rows, kernels, bias):
    """rows: (1, C, R + 2, W + 2), a zero-padded band; kernels: (36, O, C) transformed weights;
    bias (1, O, 1, 1) -> (1, O, R, W)."""
    _, c, r, w = rows.shape
    th, tw = (r - 2) // TILE, (w - 2) // TILE
    o = kernels.shape[1]
    tiles = ops.unfold(rows, TILE + 2, 1, 0, TILE).reshape(c, 36, th * tw)     # (C, 36, T)
    spectra = ops.matmul(_INPUT_TRANSFORM, tiles).swapaxes(0, 1)               # (36, C, T)
    products = ops.matmul(kernels, spectra).reshape(36, o * th * tw)           # (36, O*T)
    y = ops.matmul(_OUTPUT_TRANSFORM, products).reshape(TILE, TILE, o, th, tw)  # (4, 4, O, th, tw)
    return y.transpose(2, 3, 0, 4, 1).reshape(1, o, th * TILE, tw * TILE) + bias


@functools.lru_cache(maxsize=None)
def _compiled_band():
    """``_band`` compiled, with the options of --jit_level (set before the first conv runs)."""
    return jit(_band)
