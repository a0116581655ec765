"""The IDDPM hybrid loss in pixart/diffusion/losses.py against the formulas in float64 NumPy,
in graph mode, and for which model output channels receive gradient from which term."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pixart.diffusion.losses import IDDPMLoss

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")

SHAPE = (4, 4, 8, 8)
TIMESTEPS = np.array([0, 999, 1, 437])  # t == 0 uses the decoder NLL, the others the KL


# ------------------------------------------------------------------ reference: the formulas, float64

BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALPHAS_CUMPROD_PREV = np.append(1.0, ALPHAS_CUMPROD[:-1])
POSTERIOR_VARIANCE = BETAS * (1 - ALPHAS_CUMPROD_PREV) / (1 - ALPHAS_CUMPROD)
# Zero at t = 0: improved-DDPM uses the t = 1 value there.
POSTERIOR_LOG_VARIANCE = np.log(np.append(POSTERIOR_VARIANCE[1], POSTERIOR_VARIANCE[1:]))


def posterior_mean(x0, x_t, t):
    abar, abar_prev, beta = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD_PREV[t], BETAS[t]
    return (beta * np.sqrt(abar_prev) * x0 + (1 - abar_prev) * np.sqrt(1 - beta) * x_t) / (1 - abar)


def approx_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def decoder_log_likelihood(x, mean, log_scale):
    """log P(bin of x) under N(mean, exp(log_scale)^2) with 256 bins on [-1, 1], open outer bins."""
    upper = approx_cdf((x - mean + 1 / 255) / np.exp(log_scale))
    lower = approx_cdf((x - mean - 1 / 255) / np.exp(log_scale))
    inner = np.log(np.maximum(upper - lower, 1e-12))
    return np.where(x < -0.999, np.log(np.maximum(upper, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - lower, 1e-12)), inner))


def reference_losses(x0, t_batch, noise, model_output):
    """(loss, mse, vb), each (B,), float64; one sample at a time."""
    channels = x0.shape[1]
    mse, vb = [], []
    for b, t in enumerate(t_batch):
        eps, v = model_output[b, :channels], model_output[b, channels:]
        abar = ALPHAS_CUMPROD[t]
        x_t = np.sqrt(abar) * x0[b] + np.sqrt(1 - abar) * noise[b]
        mse.append(np.mean((noise[b] - eps) ** 2))
        x0_pred = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        model_mean = posterior_mean(x0_pred, x_t, t)
        frac = (v + 1) / 2
        model_log_variance = frac * np.log(BETAS[t]) + (1 - frac) * POSTERIOR_LOG_VARIANCE[t]
        if t == 0:
            nll = -decoder_log_likelihood(x0[b], model_mean, 0.5 * model_log_variance)
            vb.append(np.mean(nll) / math.log(2))
        else:
            true_log_variance = POSTERIOR_LOG_VARIANCE[t]
            kl = 0.5 * (
                -1
                + model_log_variance
                - true_log_variance
                + np.exp(true_log_variance - model_log_variance)
                + (posterior_mean(x0[b], x_t, t) - model_mean) ** 2 * np.exp(-model_log_variance)
            )
            vb.append(np.mean(kl) / math.log(2))
    mse, vb = np.array(mse), np.array(vb)
    return mse + vb, mse, vb


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def loss_fn():
    return IDDPMLoss()


@pytest.fixture(scope="module")
def batch():
    """Random float32 (x_start, t, noise, model_output); eps near the noise, v in [-1, 1]."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)  # crosses +-0.999: all decoder branches
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    eps = (noise + 0.3 * rng.standard_normal(SHAPE)).astype(np.float32)
    v = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    return x0, TIMESTEPS, noise, np.concatenate([eps, v], axis=1)


def as_tensors(x0, t, noise, model_output):
    return Tensor(x0), Tensor(t.astype(np.int32)), Tensor(noise), Tensor(model_output)


# ------------------------------------------------------------------------------------------- tests


def test_q_sample_matches_the_formula(loss_fn, batch):
    x0, t, noise, _ = batch
    x_t = loss_fn.q_sample(Tensor(x0), Tensor(t.astype(np.int32)), Tensor(noise)).asnumpy()
    abar = ALPHAS_CUMPROD[t][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-6, atol=1e-6)


def test_losses_match_float64_formulas(loss_fn, batch):
    loss, mse, vb = (out.asnumpy() for out in loss_fn(*as_tensors(*batch)))
    x0, t, noise, model_output = batch
    expected_loss, expected_mse, expected_vb = reference_losses(
        x0.astype(np.float64), t, noise.astype(np.float64), model_output.astype(np.float64)
    )
    parts = (("mse", mse, expected_mse), ("vb", vb, expected_vb), ("loss", loss, expected_loss))
    for name, ours, expected in parts:
        assert ours.shape == (SHAPE[0],) and ours.dtype == np.float32
        print(f"{name}: max relative difference {np.max(np.abs(ours - expected) / np.abs(expected)):.2e}")
        # atol: the KL at t = 999 (about 1e-3) is a float32 sum of O(1) terms, -1 + exp(...) + ...,
        # so it carries about 1e-8 absolute rounding error, as the float32 reference does.
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)


def test_int64_timesteps_are_accepted(loss_fn, batch):
    x0, t, noise, model_output = batch
    as_int32 = loss_fn(*as_tensors(*batch))[0].asnumpy()
    as_int64 = loss_fn(Tensor(x0), Tensor(t.astype(np.int64)), Tensor(noise), Tensor(model_output))[0].asnumpy()
    np.testing.assert_array_equal(as_int32, as_int64)


def test_graph_mode_matches_pynative(loss_fn, batch):
    inputs = as_tensors(*batch)

    def forward(x0, t, noise, model_output):
        return (loss_fn.q_sample(x0, t, noise),) + loss_fn(x0, t, noise, model_output)

    def total_loss(model_output, x0, t, noise):
        return loss_fn(x0, t, noise, model_output)[0].mean()

    eager = forward(*inputs)
    compiled = ms.jit(forward)(*inputs)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-7)

    x0, t, noise, model_output = inputs
    grad_eager = ms.grad(total_loss, grad_position=0)(model_output, x0, t, noise)
    grad_compiled = ms.jit(ms.grad(total_loss, grad_position=0))(model_output, x0, t, noise)
    np.testing.assert_allclose(grad_eager.asnumpy(), grad_compiled.asnumpy(), rtol=1e-6, atol=1e-9)


def test_gradients_reach_eps_from_mse_only_and_variance_from_vb_only(loss_fn, batch):
    x0, t, noise, model_output = as_tensors(*batch)
    channels = SHAPE[1]

    def grad_of(part):
        return ms.grad(lambda out: loss_fn(x0, t, noise, out)[part].sum())(model_output).asnumpy()

    grad_loss, grad_mse, grad_vb = grad_of(0), grad_of(1), grad_of(2)
    eps = batch[3][:, :channels]
    elements = np.prod(SHAPE[1:])

    np.testing.assert_allclose(grad_mse[:, :channels], 2 * (eps - batch[2]) / elements, rtol=1e-5, atol=1e-9)
    assert not grad_mse[:, channels:].any()
    assert not grad_vb[:, :channels].any()  # the VB's mean uses a stop-gradient copy of eps
    # Nonzero for every sample (not every element: where a clamp in the decoder NLL is active,
    # or where float32 rounds a ~1e-9 gradient at t = 999 to zero, an element may get none).
    assert all(np.count_nonzero(grad_vb[b, channels:]) > 0 for b in range(SHAPE[0]))
    np.testing.assert_allclose(grad_loss, grad_mse + grad_vb, rtol=1e-6, atol=1e-10)

    # The VB gradient wrt v against central differences of the float64 reference, one element
    # per sample.  Past the first steps beta and the posterior variance nearly coincide, so the
    # gradient is tiny (about 1e-9 at t = 437, 1e-12 at t = 999, where float32 keeps little of it).
    reference_inputs = [a.astype(np.float64) for a in batch]
    step = 1e-6
    for b, t_b in enumerate(TIMESTEPS):
        index = (b, channels + b % channels, 3, 5)
        plus, minus = reference_inputs[3].copy(), reference_inputs[3].copy()
        plus[index] += step
        minus[index] -= step
        numeric = (
            reference_losses(reference_inputs[0], TIMESTEPS, reference_inputs[2], plus)[2][b]
            - reference_losses(reference_inputs[0], TIMESTEPS, reference_inputs[2], minus)[2][b]
        ) / (2 * step)
        print(f"t={t_b}: d vb / d v = {grad_vb[index]:.6e}, central difference {numeric:.6e}")
        np.testing.assert_allclose(grad_vb[index], numeric, rtol=1e-3, atol=1e-12)
