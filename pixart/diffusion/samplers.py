"""PixArt's samplers in NumPy: DPM-Solver++ (2M), DDIM (eta 0) and IDDPM ancestral sampling.

All share one small interface (:class:`Sampler`) and are listed in one registry,
``SAMPLERS`` (name -> class), that the command line, the web demo and the tests read::

    sampler = make_sampler("dpm", 20)
    x = rng.standard_normal(shape).astype(np.float32) * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        out = model(x, t)                      # classifier-free guidance: the caller's job
        x = sampler.step(out[:, :sampler.model_channels(C)], i, x)

The state is float32, like the references' torch float32 tensors; per-step coefficients are
computed once, in the precision their reference computes them.  Model output channels: the
transformer predicts 2C channels (eps, then the learned-variance values); DPM-Solver++ and DDIM
take the first C (eps), IDDPM takes all 2C.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type, Union

import numpy as np

from pixart.errors import InputError

from .schedule import (
    NUM_TRAIN_TIMESTEPS,
    DiffusionSchedule,
    check_sampling_steps,
    diffusers_alphas_cumprod,
    respaced_schedule,
)

NoiseSource = Union[np.random.Generator, Callable[[tuple], np.ndarray]]

_F32 = np.float32
_ONE = _F32(1.0)
_HALF = _F32(0.5)


def _rounded(fn, x):
    """float32 ``fn(x)`` evaluated in float64 and rounded once: matches torch's CPU float32
    log (and exp, but for rare 1-ulp cases) more often than NumPy's float32 SIMD kernels."""
    return fn(np.asarray(x, dtype=np.float64)).astype(np.float32)


SAMPLERS: Dict[str, Type["Sampler"]] = {}


def noise_function(noise: Optional[NoiseSource]) -> Callable[[tuple], np.ndarray]:
    """``shape -> float32 standard normal array`` from a seeded Generator, a callable, or None
    (a fresh unseeded generator): where a stochastic sampler draws its step noise."""
    if noise is None:
        noise = np.random.default_rng()
    if isinstance(noise, np.random.Generator):
        generator = noise
        return lambda shape: generator.standard_normal(shape, dtype=np.float32)
    return noise


def register_sampler(cls: Type["Sampler"]) -> Type["Sampler"]:
    """Class decorator: list ``cls`` under ``cls.name`` in ``SAMPLERS``."""
    if not cls.name or cls.name in SAMPLERS:
        raise ValueError(f"sampler {cls.__name__} needs a unique name, got {cls.name!r}")
    SAMPLERS[cls.name] = cls
    return cls


class Sampler:
    """Common interface of the samplers. A new sampler is one subclass decorated with
    :func:`register_sampler`; what it declares below is all the pipeline and the interfaces need.

    Class attributes (the declaration):
        name: registry key, the value of ``--sampling_method``.
        description: one line for ``-h`` and the web demo.
        stochastic: ``step`` draws fresh noise (from the ``noise`` given to the constructor).
        learned_variance: ``step`` consumes the variance channels as well as eps.
        classifier_free_guidance: the pipeline runs the unconditional batch when the guidance
            scale is above 1 (False: the model is called on the prompt alone).
        default_steps: a sensible step count for it.
    Instance attributes:
        timesteps: (N,) int64, the model timesteps to call, in call order (descending).
        init_noise_sigma: scale of the initial Gaussian latent (1 for all samplers here).
    """

    name: str = ""
    description: str = ""
    stochastic = False
    learned_variance = False
    classifier_free_guidance = True
    default_steps = 20
    init_noise_sigma = 1.0
    timesteps: np.ndarray

    @property
    def sampling_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def model_channels(self, latent_channels: int) -> int:
        """How many leading channels of the model output ``step`` takes (C or 2C)."""
        return latent_channels * (2 if self.learned_variance else 1)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Advance ``sample`` (B, C, H, W) from ``timesteps[index]`` to the next used timestep.

        ``model_output`` is (B, model_channels(C), H, W), the model evaluated at
        ``(sample, timesteps[index])``.  Returns the float32 sample for ``index + 1``
        (after the last index: the denoised latent).
        """
        raise NotImplementedError

    def _inputs(self, model_output, index, sample):
        """Validate a step's arguments and return them as float32 arrays."""
        if not 0 <= index < self.sampling_steps:
            raise ValueError(f"step index must be in [0, {self.sampling_steps}), got {index}")
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        expected = (sample.shape[0], self.model_channels(sample.shape[1])) + sample.shape[2:]
        if model_output.shape != expected:
            raise ValueError(
                f"{type(self).__name__} expects a model output of shape {expected} for a sample of "
                f"shape {sample.shape}, got {model_output.shape}"
            )
        return model_output, sample


@register_sampler
class DPMSolverSampler(Sampler):
    """DPM-Solver++ 2M, mirroring diffusers' ``DPMSolverMultistepScheduler`` with PixArt-Sigma's config.

    Config: algorithm_type dpmsolver++, solver_order 2, solver_type midpoint, linear betas
    1e-4..0.02 over 1000 steps, prediction_type epsilon, timestep_spacing linspace,
    steps_offset 0, lower_order_final True, no Karras sigmas, no thresholding, and
    final_sigmas_type "zero" (the diffusers 0.42.1 default; PixArt-Sigma's config predates the
    option).  Takes eps only (C channels).

    The first step is first order (no history yet), and so is the last: its target sigma is 0
    ("zero"), which diffusers always steps to with first order.  So with solver_order 2,
    lower_order_final changes nothing here.  In between: second-order midpoint updates using
    the previous step's x0.  ``step`` must be called with index 0, 1, 2, ... in order
    (index 0 restarts).  Scalars are float32 and follow diffusers' formulas operation by
    operation, on its float32 schedule (:func:`diffusers_alphas_cumprod`).
    """

    name = "dpm"
    description = "DPM-Solver++ 2M, as shipped with PixArt-Σ"

    def __init__(self, sampling_steps: int, noise: Optional[NoiseSource] = None):
        sampling_steps = check_sampling_steps(sampling_steps)
        if sampling_steps >= NUM_TRAIN_TIMESTEPS:
            # linspace(0, 999, 1001) rounds two points to the same timestep: a zero step size
            # that makes diffusers' second-order update divide by zero.
            raise ValueError(f"DPM-Solver++ needs fewer than {NUM_TRAIN_TIMESTEPS} steps, got {sampling_steps}")
        self.timesteps = (
            np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, sampling_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        )
        alphas_cumprod = diffusers_alphas_cumprod()
        # VP sigma = sqrt((1 - abar) / abar) at each timestep; alpha_t = 1 / sqrt(1 + sigma^2)
        # and sigma_t = sigma * alpha_t as diffusers' _sigma_to_alpha_sigma_t; the final
        # sigma 0 is handled in step().
        sigma = np.sqrt((_ONE - alphas_cumprod) / alphas_cumprod)[self.timesteps]
        self._alpha = _ONE / np.sqrt(sigma * sigma + _ONE)
        self._sigma = sigma * self._alpha
        self._lambda = _rounded(np.log, self._alpha) - _rounded(np.log, self._sigma)
        self._previous_x0: Optional[np.ndarray] = None
        self._next_index = 0

    def step(self, model_output, index, sample):
        eps, sample = self._inputs(model_output, index, sample)
        if index not in (0, self._next_index):
            raise ValueError(
                f"DPM-Solver++ steps must run in order: expected index {self._next_index}, got {index}"
            )
        alpha_s, sigma_s = self._alpha[index], self._sigma[index]
        x0 = (sample - sigma_s * eps) / alpha_s
        if index == self.sampling_steps - 1:
            # First-order step to sigma 0: (0 / sigma_s) x - alpha_t (exp(-inf) - 1) x0 = x0 exactly.
            prev_sample = x0
        else:
            alpha_t, sigma_t = self._alpha[index + 1], self._sigma[index + 1]
            h = self._lambda[index + 1] - self._lambda[index]
            alpha_expm1 = alpha_t * (_rounded(np.exp, -h) - _ONE)  # alpha_t (e^-h - 1)
            prev_sample = (sigma_t / sigma_s) * sample - alpha_expm1 * x0
            if index > 0:
                r0 = (self._lambda[index] - self._lambda[index - 1]) / h
                d1 = (_ONE / r0) * (x0 - self._previous_x0)
                prev_sample = prev_sample - (_HALF * alpha_expm1) * d1
        self._previous_x0 = x0
        self._next_index = index + 1
        return prev_sample


class _RespacedSampler(Sampler):
    """Base of the samplers over the official respaced diffusion (``IDDPM(str(sampling_steps))``)."""

    def __init__(self, sampling_steps: int, noise: Optional[NoiseSource] = None):
        self.schedule: DiffusionSchedule = respaced_schedule(sampling_steps)
        self.timesteps = self.schedule.timesteps[::-1].copy()

    def _coef(self, table: np.ndarray, index: int) -> np.float32:
        """Float64 ``table`` entry for call-order ``index``, as float32 (the reference's
        ``_extract_into_tensor(...).float()``); schedule index 0 is called last."""
        return _F32(table[self.sampling_steps - 1 - index])

    def _predict_x0(self, eps: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """x0 = x / sqrt(abar) - sqrt(1 / abar - 1) * eps  (``_predict_xstart_from_eps``)."""
        s = self.schedule
        return self._coef(s.sqrt_recip_alphas_cumprod, index) * sample - self._coef(
            s.sqrt_recipm1_alphas_cumprod, index
        ) * eps


@register_sampler
class DDIMSampler(_RespacedSampler):
    """Deterministic DDIM (eta = 0) as the official ``ddim_sample_loop`` over ``IDDPM(str(sampling_steps))``.

    Each step moves to the next timestep actually used (the respaced diffusion's
    ``alphas_cumprod_prev``; 1 after the last step), unlike diffusers' ``DDIMScheduler``, which
    moves to ``t - 1000 // sampling_steps``.  Takes eps only (C channels)::

        x0     = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps

    The reference re-derives eps from x0 before the second line; with no x0 clipping
    (PixArt samples with ``clip_denoised=False``) that is the model's eps, used here directly.
    """

    name = "ddim"
    description = "DDIM, eta 0, stepping between the official respaced timesteps"

    def __init__(self, sampling_steps: int, noise: Optional[NoiseSource] = None):
        super().__init__(sampling_steps)
        alphas_cumprod_prev = self.schedule.alphas_cumprod_prev
        self._sqrt_alphas_cumprod_prev = np.sqrt(alphas_cumprod_prev)
        self._sqrt_one_minus_alphas_cumprod_prev = np.sqrt(1.0 - alphas_cumprod_prev)

    def step(self, model_output, index, sample):
        eps, sample = self._inputs(model_output, index, sample)
        x0 = self._predict_x0(eps, index, sample)
        return self._coef(self._sqrt_alphas_cumprod_prev, index) * x0 + self._coef(
            self._sqrt_one_minus_alphas_cumprod_prev, index
        ) * eps


@register_sampler
class IDDPMSampler(_RespacedSampler):
    """Ancestral sampling with learned variance: the official ``p_sample_loop`` over ``IDDPM(str(sampling_steps))``.

    Takes all 2C model channels: eps, then v in [-1, 1] interpolating the log variance
    between the clipped posterior variance and beta of the *respaced* schedule
    (``learned_range``)::

        x0       = x / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps      (clip_denoised=False)
        mean     = posterior_mean_coef1_t x0 + posterior_mean_coef2_t x
        log_var  = frac log(beta_t) + (1 - frac) log(beta~_t),   frac = (v + 1) / 2
        x_prev   = mean + exp(log_var / 2) z,   z ~ N(0, I), no noise at the last step (t = 0)

    Args:
        noise: a seeded ``np.random.Generator`` or a callable ``shape -> float32 array`` that
            supplies z; None uses a fresh unseeded generator.
    """

    name = "iddpm"
    description = "IDDPM ancestral sampling with the learned variance (needs ~100 steps)"
    stochastic = True
    learned_variance = True
    default_steps = 100

    def __init__(self, sampling_steps: int, noise: Optional[NoiseSource] = None):
        super().__init__(sampling_steps)
        self._noise = noise_function(noise)

    def step(self, model_output, index, sample):
        model_output, sample = self._inputs(model_output, index, sample)
        eps, var_values = np.split(model_output, 2, axis=1)
        s = self.schedule
        x0 = self._predict_x0(eps, index, sample)
        mean = (
            self._coef(s.posterior_mean_coef1, index) * x0 + self._coef(s.posterior_mean_coef2, index) * sample
        )
        if index == self.sampling_steps - 1:
            return mean
        frac = (var_values + _ONE) / _F32(2.0)
        log_variance = frac * self._coef(s.log_betas, index) + (_ONE - frac) * self._coef(
            s.posterior_log_variance_clipped, index
        )
        z = np.asarray(self._noise(sample.shape), dtype=np.float32)
        return mean + np.exp(_HALF * log_variance) * z


@register_sampler
class LCMSampler(Sampler):
    """Latent Consistency Model sampling (PixArt-δ), as diffusers' ``LCMScheduler`` with its
    defaults on PixArt's linear schedule: for LCM-distilled models, 1 to 8 steps.

    Timesteps: the 50 "origin" steps [999, 979, ..., 19] of the distillation, of which
    ``floor(linspace(0, 50, n, endpoint=False))`` are taken (4 steps: 999, 759, 499, 259). Each
    step predicts x0 from eps and applies the consistency boundary condition (sigma_data 0.5,
    timesteps scaled by 10)::

        c_skip = 0.25 / ((10 t)^2 + 0.25),   c_out = 10 t / sqrt((10 t)^2 + 0.25)
        denoised = c_out x0 + c_skip x
        x_prev   = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z,   z ~ N(0, I), none after the last step

    Float32 throughout, on diffusers' float32 schedule, as its torch tensors compute it. Takes
    eps only (C channels).
    """

    name = "lcm"
    description = "Latent Consistency Model (PixArt-δ): 1-8 steps, for LCM-distilled models"
    stochastic = True
    default_steps = 4
    ORIGINAL_STEPS = 50          # the distillation's skipped-step schedule
    TIMESTEP_SCALING = 10
    SIGMA_DATA = 0.5

    def __init__(self, sampling_steps: int, noise: Optional[NoiseSource] = None):
        sampling_steps = check_sampling_steps(sampling_steps)
        if sampling_steps > self.ORIGINAL_STEPS:
            raise InputError(f"LCM takes at most {self.ORIGINAL_STEPS} steps (its distillation schedule), "
                             f"got {sampling_steps}")
        skip = NUM_TRAIN_TIMESTEPS // self.ORIGINAL_STEPS
        origin = (np.arange(1, self.ORIGINAL_STEPS + 1) * skip - 1)[::-1]
        picked = np.floor(np.linspace(0, self.ORIGINAL_STEPS, sampling_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picked].astype(np.int64)
        self._alphas_cumprod = diffusers_alphas_cumprod()
        self._noise = noise_function(noise)

    @classmethod
    def boundary_scalings(cls, t: int) -> Tuple[np.float32, np.float32]:
        """(c_skip, c_out) at timestep t, in float32 as LCMScheduler computes them from a timestep tensor."""
        scaled = t * cls.TIMESTEP_SCALING
        sigma2 = _F32(cls.SIGMA_DATA ** 2)
        denominator = _F32(scaled * scaled) + sigma2
        return sigma2 / denominator, _F32(scaled) / np.sqrt(denominator)

    def step(self, model_output, index, sample):
        eps, sample = self._inputs(model_output, index, sample)
        t = int(self.timesteps[index])
        alpha = self._alphas_cumprod[t]
        x0 = (sample - np.sqrt(_ONE - alpha) * eps) / np.sqrt(alpha)
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * x0 + c_skip * sample
        if index == self.sampling_steps - 1:
            return denoised
        alpha_prev = self._alphas_cumprod[int(self.timesteps[index + 1])]
        z = np.asarray(self._noise(sample.shape), dtype=np.float32)
        return np.sqrt(alpha_prev) * denoised + np.sqrt(_ONE - alpha_prev) * z


def make_sampler(name: str, sampling_steps: int, noise: Optional[NoiseSource] = None) -> Sampler:
    """Build the registered sampler ``name`` for ``sampling_steps`` steps.

    ``noise`` (a seeded ``np.random.Generator`` or ``shape -> array`` callable) feeds the
    per-step noise of stochastic samplers; the others ignore it.
    """
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](sampling_steps, noise=noise)


def describe_samplers() -> str:
    """'name: description' of every registered sampler, for help texts."""
    return "; ".join(f"{cls.name}: {cls.description}" for cls in SAMPLERS.values())
