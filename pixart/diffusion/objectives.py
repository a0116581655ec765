"""What a training step minimises: the diffusion loss, or latent consistency distillation.

An objective is a cell holding the models it needs; ``construct(x0, t, noise, cond)`` returns
``(loss, *metrics)`` as scalars, the loss the one differentiated. ``draw_timesteps(rng, n)``
draws the timesteps of n samples, so a run's randomness stays ``default_rng([seed, step])``.

* :class:`DiffusionObjective`: the IDDPM hybrid loss PixArt is trained with (eps MSE plus the
  variational bound of the learned variance).
* :class:`LCMObjective`: latent consistency distillation as PixArt-δ's ``train_pixart_lcm.py``:
  a frozen teacher guided at a fixed w, one DDIM step between the 50 skipped timesteps, the
  consistency boundary condition on student and target, a pseudo-Huber loss.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from pixart.diffusion.losses import IDDPMLoss
from pixart.diffusion.samplers import LCMSampler
from pixart.diffusion.schedule import NUM_TRAIN_TIMESTEPS


class DiffusionObjective(nn.Cell):
    """The IDDPM hybrid loss of ``model``'s prediction at ``x_t = q_sample(x0, t, noise)``."""

    metric_names = ("mse", "vb")

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # the model's parameters keep their own names
        self.model = model
        self.loss = IDDPMLoss()

    @staticmethod
    def draw_timesteps(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, NUM_TRAIN_TIMESTEPS, size=n)

    def construct(self, x0, t, noise, cond):
        x_t = self.loss.q_sample(x0, t, noise)
        loss, mse, vb = self.loss(x0, t, noise, self.model(x_t, t, cond))
        return loss.mean(), mse.mean(), vb.mean()


class LCMObjective(nn.Cell):
    """Latent consistency distillation of ``teacher`` into ``student`` (PixArt-δ).

    With ``t`` one of the skipped timesteps ``(1..50) * 20 - 1`` and ``s = max(t - 20, 0)``::

        x_t     = q_sample(x0, t, noise)
        pred    = c_skip(t) x_t + c_out(t) x0_student(x_t, t)                    (differentiated)
        x0_T    = x0_c + w (x0_c - x0_u),  eps_T = eps_c + w (eps_c - eps_u)     teacher, caption / null caption
        x_s     = sqrt(abar_s) x0_T + sqrt(1 - abar_s) eps_T                      one DDIM step (abar_0 at s = 0)
        target  = c_skip(s) x_s + c_out(s) x0_target(x_s, s)                     (no gradient)
        loss    = mean(sqrt((pred - target)^2 + c^2) - c)    (pseudo-Huber; "l2": mean((pred - target)^2))

    x0_m(x, t) is ``(x - sqrt(1 - abar_t) eps_m) / sqrt(abar_t)`` from a model's eps. The teacher's
    null caption is its ``y_embedding`` (every caption dropped) under the caption's own mask,
    as the reference. ``target`` is the EMA of the student (full distillation) or the student
    itself under no gradient (LCM-LoRA). Only the student is differentiated.
    """

    metric_names = ("l2",)

    def __init__(self, student, teacher, target, guidance: float = 4.5, loss: str = "huber", huber_c: float = 1e-3):
        if loss not in ("huber", "l2"):
            raise ValueError(f"LCM loss must be huber or l2, got {loss!r}")
        super().__init__(auto_prefix=False)  # the models' parameters keep their own names
        self.student, self.teacher, self.target = student, teacher, target
        self.guidance = Tensor(np.float32(guidance))
        self.huber = loss == "huber"
        self.huber_c = Tensor(np.float32(huber_c))  # a Tensor: see optim._graph_scalars on tiny float constants
        self.diffusion = IDDPMLoss()                # q_sample and the float64-derived x0 tables
        self.skip = NUM_TRAIN_TIMESTEPS // LCMSampler.ORIGINAL_STEPS

    @classmethod
    def draw_timesteps(cls, rng: np.random.Generator, n: int) -> np.ndarray:
        skip = NUM_TRAIN_TIMESTEPS // LCMSampler.ORIGINAL_STEPS
        return (rng.integers(0, LCMSampler.ORIGINAL_STEPS, size=n) + 1) * skip - 1

    @staticmethod
    def _scalings(t) -> Tuple[Tensor, Tensor]:
        """(c_skip, c_out) of the consistency boundary condition, (B, 1, 1, 1)."""
        scaled = t.astype(ms.float32).reshape(-1, 1, 1, 1) * LCMSampler.TIMESTEP_SCALING
        sigma2 = LCMSampler.SIGMA_DATA ** 2
        denominator = scaled * scaled + sigma2
        return sigma2 / denominator, scaled / ops.sqrt(denominator)

    def _x0(self, x, t, eps):
        d = self.diffusion
        return d.extract(d.sqrt_recip_alphas_cumprod, t, 4) * x - d.extract(d.sqrt_recipm1_alphas_cumprod, t, 4) * eps

    def construct(self, x0, t, noise, cond):
        channels = x0.shape[1]
        caption, caption_mask, resolution, aspect_ratio, drop_caption, control = cond
        x_t = self.diffusion.q_sample(x0, t, noise)
        c_skip_t, c_out_t = self._scalings(t)
        eps = self.student(x_t, t, cond)[:, :channels]
        prediction = c_skip_t * x_t + c_out_t * self._x0(x_t, t, eps)

        eps_c = ops.stop_gradient(self.teacher(x_t, t, cond)[:, :channels])
        null = (caption, caption_mask, resolution, aspect_ratio, ops.ones_like(drop_caption), control)
        eps_u = ops.stop_gradient(self.teacher(x_t, t, null)[:, :channels])
        x0_c, x0_u = self._x0(x_t, t, eps_c), self._x0(x_t, t, eps_u)
        x0_guided = x0_c + self.guidance * (x0_c - x0_u)
        eps_guided = eps_c + self.guidance * (eps_c - eps_u)
        s = ops.maximum(t - self.skip, 0)
        d = self.diffusion
        x_s = d.extract(d.sqrt_alphas_cumprod, s, 4) * x0_guided + d.extract(
            d.sqrt_one_minus_alphas_cumprod, s, 4) * eps_guided

        eps_target = self.target(x_s, s, cond)[:, :channels]
        c_skip_s, c_out_s = self._scalings(s)
        target = ops.stop_gradient(c_skip_s * x_s + c_out_s * self._x0(x_s, s, eps_target))
        squared = (prediction - target) ** 2
        loss = (ops.sqrt(squared + self.huber_c * self.huber_c) - self.huber_c).mean() if self.huber else squared.mean()
        return loss, squared.mean()
