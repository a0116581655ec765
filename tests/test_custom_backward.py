"""The cells with their own backward (written for speed and memory on CPU) give torch's gradients,
eagerly and compiled: the attention matmuls and softmax, the head split and join, the affine-free
LayerNorm of the transformer blocks, their adaLN modulation and gates, and the composed GELU."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor, nn

from pixart.models.attention import LastAxisSoftmax, heads_first, math_attention, tokens_first
from pixart.models.pixart import Gated, LayerNorm, Modulate, gelu_tanh_composed

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")


class WeightedSum(nn.Cell):
    """sum(cell(x) * w): its gradient in x is cell's backward applied to w."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x, w):
        return (self.cell(x) * w).sum()


def gradient(cell, x, w, compiled):
    grad = ms.grad(WeightedSum(cell), grad_position=0)

    def run(a, b):
        return grad(a, b)

    return (ms.jit(run) if compiled else run)(Tensor(x), Tensor(w)).asnumpy()


def torch_gradient(fn, x, w):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (fn(xt) * torch.tensor(w, dtype=torch.float64)).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 9)])
def test_softmax_backward_matches_torch(compiled, shape):
    rng = np.random.default_rng(0)
    x, w = (3 * rng.standard_normal(shape)).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    expected = torch_gradient(lambda t: torch.softmax(t, -1), x, w)
    np.testing.assert_allclose(gradient(LastAxisSoftmax(), x, w, compiled), expected, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape, eps", [((2, 6, 48), 1e-6), ((5, 33), 1e-2)])
def test_layer_norm_backward_matches_torch(compiled, shape, eps):
    rng = np.random.default_rng(1)
    x = (2 * rng.standard_normal(shape) + 1).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    expected = torch_gradient(lambda t: torch.nn.functional.layer_norm(t, shape[-1:], eps=eps), x, w)
    np.testing.assert_allclose(gradient(LayerNorm(shape[-1], eps=eps), x, w, compiled), expected, atol=1e-5)


class AttentionLoss(nn.Cell):
    """sum(attention(q, k, v, bias) * w)."""

    def construct(self, q, k, v, bias, w):
        return (math_attention(q, k, v, bias) * w).sum()


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_backward_matches_torch(compiled):
    rng = np.random.default_rng(2)
    b, heads, nq, nk, d = 2, 3, 5, 7, 8
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((b, heads, nq, d), (b, heads, nk, d), (b, heads, nk, d)))
    bias = np.where(rng.random((b, 1, 1, nk)) < 0.3, -1e4, 0.0).astype(np.float32)
    w = rng.standard_normal((b, heads, nq, d)).astype(np.float32)
    grad = ms.grad(AttentionLoss(), grad_position=(0, 1, 2))

    def run(*args):
        return grad(*args)

    ours = (ms.jit(run) if compiled else run)(*(Tensor(a) for a in (q, k, v, bias, w)))
    qt, kt, vt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.tensor(bias, dtype=torch.float64))
    (out * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for got, expected in zip(ours, (qt.grad, kt.grad, vt.grad)):
        np.testing.assert_allclose(got.asnumpy(), expected.numpy(), atol=1e-5)


class ModulationLoss(nn.Cell):
    """sum(gated(gate, modulate(x, shift, scale)) * w)."""

    def __init__(self):
        super().__init__()
        self.modulate, self.gated = Modulate(), Gated()

    def construct(self, x, shift, scale, gate, w):
        return (self.gated(gate, self.modulate(x, shift, scale)) * w).sum()


@pytest.mark.parametrize("compiled", [False, True])
def test_modulation_and_gate_backward_match_torch(compiled):
    rng = np.random.default_rng(3)
    b, n, d = 2, 7, 12
    x, w = rng.standard_normal((b, n, d)).astype(np.float32), rng.standard_normal((b, n, d)).astype(np.float32)
    shift, scale, gate = (rng.standard_normal((b, 1, d)).astype(np.float32) for _ in range(3))
    grad = ms.grad(ModulationLoss(), grad_position=(0, 1, 2, 3))

    def run(*args):
        return grad(*args)

    ours = (ms.jit(run) if compiled else run)(*(Tensor(a) for a in (x, shift, scale, gate, w)))
    inputs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, shift, scale, gate)]
    xt, shift_t, scale_t, gate_t = inputs
    ((gate_t * (xt * (1 + scale_t) + shift_t)) * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for got, expected in zip(ours, inputs):
        np.testing.assert_allclose(got.asnumpy(), expected.grad.numpy(), atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_composed_gelu_backward_matches_torch(compiled):
    rng = np.random.default_rng(4)
    x = np.concatenate([np.linspace(-8, 8, 161), 3 * rng.standard_normal(200)]).astype(np.float32).reshape(19, 19)
    w = rng.standard_normal(x.shape).astype(np.float32)
    expected = torch_gradient(lambda t: torch.nn.functional.gelu(t, approximate="tanh"), x, w)
    np.testing.assert_allclose(gradient(gelu_tanh_composed, x, w, compiled), expected, rtol=1e-5, atol=1e-6)


class HeadsRoundTrip(nn.Cell):
    """sum(tokens_first(heads_first(x) * u) * w): the head split, a product in the (B, heads, N, d) layout, the join."""

    def __init__(self, heads, gather):
        super().__init__()
        self.heads, self.gather = heads, gather

    def construct(self, x, u, w):
        return (tokens_first(heads_first(x, self.heads, self.gather) * u, self.gather) * w).sum()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("gather", [True, False])
def test_head_split_and_join_are_exact_copies_both_ways(compiled, gather):
    rng = np.random.default_rng(5)
    b, n, heads, d = 2, 7, 3, 4
    x, w = (rng.standard_normal((b, n, heads * d)).astype(np.float32) for _ in range(2))
    u = rng.standard_normal((b, heads, n, d)).astype(np.float32)

    def split(a):
        return heads_first(a, heads, gather)

    split_heads = ms.jit(split) if compiled else split
    np.testing.assert_array_equal(split_heads(Tensor(x)).asnumpy(), x.reshape(b, n, heads, d).swapaxes(1, 2))
    grad = ms.grad(HeadsRoundTrip(heads, gather), grad_position=(0, 1))

    def run(*args):
        return grad(*args)

    dx, du = (ms.jit(run) if compiled else run)(Tensor(x), Tensor(u), Tensor(w))
    w_heads = w.reshape(b, n, heads, d).swapaxes(1, 2)
    np.testing.assert_array_equal(du.asnumpy(), w_heads * x.reshape(b, n, heads, d).swapaxes(1, 2))
    np.testing.assert_array_equal(dx.asnumpy(), (w_heads * u).swapaxes(1, 2).reshape(b, n, heads * d))
