"""Scaled dot-product attention, two ways: ``math`` (any device, any dtype) and ``flash``.

``math`` computes scores and softmax with matmuls, queries in chunks so the score block never
exceeds a budget: at 2K (16,384 image tokens) the whole (B, heads, N, N) fp32 score tensor of
a batch of two would be 34 GB, a chunk of it is 1 GiB.

``flash`` calls MindSpore's fused ``flash_attention_score`` (Atlas A2 / A3 NPUs only, fp16 or
bf16 inputs), whose head size must be a multiple of 16: PixArt-XL's 72 is zero-padded to 80.
Zero columns leave every q.k product unchanged and give zero output columns, which are cut off
again; the softmax scale stays that of the true head size.

Shapes: q (B, heads, Nq, d); k, v (B, heads, Nk, d); returns (B, heads, Nq, d).
"""
from __future__ import annotations

import logging
from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from pixart.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTION_KERNELS = ("auto", "math", "flash")
SCORES_BUDGET = 1 << 28  # elements of one chunk of attention scores (1 GiB in fp32)
FLASH_HEAD_DIM_MULTIPLE = 16  # flash_attention_score takes head sizes 16, 32, ..., 512
# The NPUs MindSpore's flash_attention_score runs on (Atlas A2 and A3 training series).
FLASH_SOCS = ("ascend910b", "ascend910_93")


def math_attention(q, k, v, bias=None, budget: Optional[int] = None):
    """Softmax(q k^T / sqrt(d) + bias) v with the softmax in fp32, ``budget`` (default
    ``SCORES_BUDGET``) score elements at a time; ``budget`` 0: all at once, without reading the
    token counts (graphs whose token count is symbolic, see ``pixart.models.pixart.use_symbolic_grid``).

    bias: None or additive, broadcastable to (B, heads, Nq, Nk): 0 for kept keys, a large
    negative number for dropped ones."""
    d = q.shape[-1]
    q = q * (d ** -0.5)
    if budget == 0:
        return _attend(q, k, v, bias)
    b, heads, nq, _ = q.shape
    nk = k.shape[2]
    chunk = max(1, min(nq, (budget or SCORES_BUDGET) // (b * heads * nk)))
    if chunk == nq:  # one chunk: no slice (a strided copy of q, ~16 ms per call at XL/2 256px on CPU)
        return _attend(q, k, v, bias)
    outs = [_attend(q[:, :, start:start + chunk], k, v, bias) for start in range(0, nq, chunk)]
    return ops.concat(outs, axis=2)


# batched matmuls: plain, with the second operand transposed, with the first transposed
_matmul, _matmul_nt, _matmul_tn = ops.BatchMatMul(), ops.BatchMatMul(transpose_b=True), ops.BatchMatMul(transpose_a=True)


class _Scores(nn.Cell):
    """q k^T for (..., Nq, d) and (..., Nk, d), by BatchMatMul(transpose_b) rather than a
    Transpose of k, and with its own backward: in a compiled graph MindSpore 2.10's CPU Transpose
    kernel keeps a buffer twice its output's size for the life of the graph (18 MB a call at
    XL/2 512px), and the autodiff of BatchMatMul kept more than the two matmuls below need."""

    def construct(self, q, k):
        return _matmul_nt(q, k)

    def bprop(self, q, k, out, dout):
        return _matmul(dout, k), _matmul_tn(dout, q)


class _WeightedValues(nn.Cell):
    """p v for (..., Nq, Nk) and (..., Nk, d), with its backward written as matmuls with
    transpose flags (see ``_Scores``)."""

    def construct(self, p, v):
        return _matmul(p, v)

    def bprop(self, p, v, out, dout):
        return _matmul_nt(dout, v), _matmul_tn(p, dout)


_scores = _Scores()
_weighted_values = _WeightedValues()


def _attend(q, k, v, bias):
    scores = _scores(q, k).astype(ms.float32)
    if bias is not None:
        # broadcast explicitly: see pixart.models.pixart.broadcast_as
        scores = scores + ops.broadcast_to(bias, scores.shape)
    return _weighted_values(_softmax(scores).astype(v.dtype), v)


def _transposed_rows(p, q):
    """(q, p) int32: the rows of a (p, q) grid, numbered row-major, in transposed order ([j, i] = i q + j)."""
    one = Tensor(1, ms.int32)
    first = ops.range(Tensor(0, ms.int32), ops.scalar_to_tensor(p, ms.int32), one) * q
    second = ops.range(Tensor(0, ms.int32), ops.scalar_to_tensor(q, ms.int32), one)
    return first.reshape(1, -1) + second.reshape(-1, 1)


def _swap_middle(x):
    b, p, q, d = x.shape
    return ops.gather(x.reshape(b, -1, d), _transposed_rows(p, q), 1)


class _GatherSwap(nn.Cell):
    """(B, P, Q, d) -> (B, Q, P, d) as a Gather of rows of d values: in a compiled graph MindSpore
    2.10's CPU Transpose kernel keeps a buffer about twice its output's size for the life of the
    graph (attention's head transposes kept 87 MB a block in an XL/2 train step at 256px, batch
    2), its Gather keeps none and copies faster (1.19 against 1.56 ms for (2, 1024, 16, 72)).
    The backward is the same swap back (autodiff's would scatter-add)."""

    def construct(self, x):
        return _swap_middle(x)

    def bprop(self, x, out, dout):
        return _swap_middle(dout),


_gather_swap = _GatherSwap()


def heads_first(x, heads: int, gather: bool):
    """(B, N, heads * d) -> (B, heads, N, d); ``gather``: by ``_GatherSwap`` (CPU), else a Transpose."""
    b, _, dim = x.shape
    # the token count as -1, not N: with a symbolic N (use_symbolic_grid) and batch == heads,
    # MindSpore 2.10's shape inference mixes the dimensions up and a reshape fails at run time
    x = x.reshape(b, -1, heads, dim // heads)
    return _gather_swap(x) if gather else x.swapaxes(1, 2)


def tokens_first(x, gather: bool):
    """(B, heads, N, d) -> (B, N, heads * d), the inverse of ``heads_first``."""
    b, heads, _, d = x.shape
    return (_gather_swap(x) if gather else x.swapaxes(1, 2)).reshape(b, -1, heads * d)


_outer = ops.MatMul()


def broadcast_rows(v, n: int):
    """(M, 1) -> (M, n), every row its value, as the outer product with a row of ones: MindSpore
    2.10's CPU ``BroadcastTo`` along the last axis ran 6 ms for (8192, 300) where this takes 1.5
    (the same values: x * 1 is exact), and a broadcasting binary op keeps a buffer of its output's
    size for the life of a compiled graph (see ``pixart.models.pixart.broadcast_as``)."""
    return _outer(v, ops.ones((1, n), v.dtype))


class LastAxisSoftmax(nn.Cell):
    """Softmax over the last axis, with its backward reducing over the rows of a 2-D view:
    MindSpore 2.10's CPU autodiff sums the 4-D score tensor about 10x slower, and its forward
    plus backward of XL/2 256px scores took 2.2x this cell's time."""

    def construct(self, x):
        return ops.softmax(x, axis=-1)

    def bprop(self, x, out, dout):
        n = x.shape[-1]
        y, g = out.reshape(-1, n), dout.reshape(-1, n)
        return ((g - broadcast_rows((g * y).sum(-1, keepdims=True), n)) * y).reshape(x.shape),


_softmax = LastAxisSoftmax()


def flash_attention(q, k, v, bias=None):
    """``math_attention`` through ``flash_attention_score`` (BNSD layout; its mask is 1 where a key is dropped)."""
    b, heads, nq, d = q.shape
    padded = -(-d // FLASH_HEAD_DIM_MULTIPLE) * FLASH_HEAD_DIM_MULTIPLE
    if padded != d:
        pad = (0, padded - d)
        q, k, v = ops.pad(q, pad), ops.pad(k, pad), ops.pad(v, pad)
    drop = None if bias is None else ops.broadcast_to(bias < 0, (b, 1, nq, k.shape[2])).astype(ms.uint8)
    out = ops.flash_attention_score(q, k, v, heads, attn_mask=drop, scalar_value=d ** -0.5, input_layout="BNSD")
    return out[..., :d] if padded != d else out


def attention(q, k, v, bias=None, kernel: str = "math"):
    """Multi-head attention with ``kernel`` (``math``, ``flash``, or ``math_unchunked``: math in
    one chunk); see the module docstring."""
    if kernel == "flash":
        return flash_attention(q, k, v, bias)
    return math_attention(q, k, v, bias, budget=0 if kernel == "math_unchunked" else None)


def ascend_soc() -> str:
    """The NPU's SoC name as MindSpore reports it (``ascend910b``, ...), empty off Ascend."""
    try:
        from mindspore._c_expression import MSContext  # no public API names the SoC in 2.10
        return MSContext.get_instance().get_ascend_soc_version() or ""
    except (ImportError, AttributeError, RuntimeError):
        return ""


def flash_unavailable_reason(device: str, dtype) -> str:
    """Why ``flash_attention_score`` cannot run on ``device`` in ``dtype``; empty when it can."""
    if device != "Ascend":
        return f"flash attention runs on Ascend NPUs only, not on {device}"
    if dtype not in (ms.float16, ms.bfloat16):
        return "flash attention computes in fp16 or bf16, not fp32 (use --dtype fp16 or bf16)"
    if not hasattr(ops, "flash_attention_score"):
        return f"this MindSpore ({ms.__version__}) has no flash_attention_score"
    soc = ascend_soc()
    if soc not in FLASH_SOCS:
        return f"flash_attention_score runs on Atlas A2/A3 ({', '.join(FLASH_SOCS)}), this NPU is {soc or 'unknown'}"
    return ""


def choose_attention(requested: str, device: str, dtype) -> str:
    """The attention kernel for ``requested`` (auto, math or flash) on ``device`` in ``dtype``.

    auto is flash where it can run and math elsewhere; flash where it cannot run is a ConfigError
    saying why."""
    if requested not in ATTENTION_KERNELS:
        raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)}, not {requested!r}")
    if requested == "math":
        return "math"
    reason = flash_unavailable_reason(device, dtype)
    if requested == "flash" and reason:
        raise ConfigError(f"--attention flash cannot run here: {reason}")
    if reason:
        logger.info("attention: math (%s)", reason)
    return "math" if reason else "flash"
