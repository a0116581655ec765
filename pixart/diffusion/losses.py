"""PixArt's training objective in MindSpore: improved-DDPM's hybrid loss with learned-range variance.

Matches the official ``GaussianDiffusion.training_losses`` as PixArt configures it
(``IDDPM(str(1000))``: epsilon prediction, ``LEARNED_RANGE`` variance, ``LossType.MSE``)::

    loss = mse + vb
    mse  = mean over C,H,W of (noise - eps_pred)^2
    vb   = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / log 2                         (t > 0)
         = -log p(x_0 | x_1) / log 2, discretized Gaussian decoder, averaged over C,H,W  (t == 0)

p's mean comes from a stop-gradient copy of eps_pred (the reference's ``frozen_out``), so
the eps channels learn from the MSE only and the variance channels from the VB only.  The
reference scales vb by ``num_timesteps / 1000`` only for ``LossType.RESCALED_MSE``; PixArt
uses ``MSE``, and with 1000 training steps that factor is 1 anyway, so there is no scaling.

Only ``mindspore.ops`` / ``nn`` primitives that have CPU kernels are used; everything is
float32 with float64-computed coefficient tables, as the reference (float64 NumPy tables
cast per lookup), and it compiles in graph mode (``ms.jit``).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from mindspore import Tensor, nn, ops

from .schedule import training_schedule

_LOG2 = math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_HALF_BIN = 1.0 / 255.0  # half the width of one of 256 pixel bins in [-1, 1]
_LOG_FLOOR = 1e-12


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.mean(axis=tuple(range(1, x.ndim)))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by improved-DDPM."""
    return 0.5 * (1.0 + ops.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * ops.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of ``x`` under N(means, exp(log_scales)^2) discretized
    to 256 bins over [-1, 1], the outer bins extending to +-infinity (improved-DDPM)."""
    centered_x = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=_LOG_FLOOR))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=_LOG_FLOOR))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=_LOG_FLOOR))
    return ops.where(x < -0.999, log_cdf_plus, ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class IDDPMLoss(nn.Cell):
    """Improved-DDPM hybrid loss over PixArt's 1000-step linear schedule.

    Typical train step::

        x_t = loss_fn.q_sample(x_start, t, noise)
        model_output = model(x_t, t, ...)                     # (B, 2C, H, W)
        loss, mse, vb = loss_fn(x_start, t, noise, model_output)
        loss.mean()
    """

    def __init__(self):
        super().__init__()
        schedule = training_schedule()
        self.num_timesteps = schedule.num_timesteps

        def table(values: np.ndarray) -> Tensor:
            return Tensor(np.asarray(values, dtype=np.float32))

        self.sqrt_alphas_cumprod = table(schedule.sqrt_alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = table(schedule.sqrt_one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = table(schedule.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = table(schedule.sqrt_recipm1_alphas_cumprod)
        self.posterior_mean_coef1 = table(schedule.posterior_mean_coef1)
        self.posterior_mean_coef2 = table(schedule.posterior_mean_coef2)
        self.posterior_log_variance_clipped = table(schedule.posterior_log_variance_clipped)
        self.log_betas = table(schedule.log_betas)

    @staticmethod
    def extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
        """``values[t]`` for a batch of timesteps t (B,), shaped (B, 1, ..., 1) with ``ndim`` dims."""
        return ops.gather(values, t, 0).reshape((-1,) + (1,) * (ndim - 1))

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0): sqrt(abar_t) x_start + sqrt(1 - abar_t) noise, all (B, C, H, W)."""
        n = x_start.ndim
        return (
            self.extract(self.sqrt_alphas_cumprod, t, n) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise
        )

    def _posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        return (
            self.extract(self.posterior_mean_coef1, t, n) * x_start
            + self.extract(self.posterior_mean_coef2, t, n) * x_t
        )

    def construct(
        self, x_start: Tensor, t: Tensor, noise: Tensor, model_output: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-sample losses.

        Args:
            x_start: (B, C, H, W) clean latents.
            t: (B,) int timesteps in [0, num_timesteps).
            noise: (B, C, H, W) the noise ``q_sample`` used to make the model's input x_t.
            model_output: (B, 2C, H, W) model prediction: eps, then variance values in [-1, 1].

        Returns:
            ``(loss, mse, vb)``, each (B,) float32; ``loss = mse + vb``, vb in bits.
        """
        n = x_start.ndim
        channels = x_start.shape[1]
        eps_pred = model_output[:, :channels]
        var_values = model_output[:, channels:]
        mse = _mean_flat((noise - eps_pred) ** 2)

        x_t = self.q_sample(x_start, t, noise)
        true_mean = self._posterior_mean(x_start, x_t, t)
        posterior_log_variance = self.extract(self.posterior_log_variance_clipped, t, n)

        frozen_eps = ops.stop_gradient(eps_pred)
        pred_x_start = (
            self.extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, n) * frozen_eps
        )
        model_mean = self._posterior_mean(pred_x_start, x_t, t)
        # learned_range: v = -1 gives the clipped posterior variance, v = 1 gives beta_t.
        frac = (var_values + 1.0) / 2.0
        model_log_variance = (
            frac * self.extract(self.log_betas, t, n) + (1.0 - frac) * posterior_log_variance
        )

        kl = normal_kl(true_mean, posterior_log_variance, model_mean, model_log_variance)
        kl = _mean_flat(kl) / _LOG2
        decoder_nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        ) / _LOG2
        vb = ops.where(t == 0, decoder_nll, kl)
        return mse + vb, mse, vb
