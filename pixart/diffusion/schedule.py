"""Noise schedules of PixArt's discrete diffusion (1000 training steps, linear betas 1e-4 -> 0.02).

Two numerically different copies of the same schedule exist in the references, and each
piece of this package follows the one its reference uses:

* The official PixArt / improved-DDPM code (``diffusion/model/gaussian_diffusion.py``,
  ``respace.py``) builds float64 NumPy tables: ``np.linspace(scale * 1e-4, scale * 0.02, n)``
  with ``scale = 1000 / n``.  :func:`linear_betas` and :class:`DiffusionSchedule` follow it;
  the DDIM and IDDPM samplers and the training loss use these tables.
* diffusers' schedulers (PixArt-Sigma ships ``DPMSolverMultistepScheduler``) build float32
  tables: ``torch.linspace(1e-4, 0.02, n, dtype=float32)`` and ``torch.cumprod`` (which
  accumulates in float64 on CPU and rounds each entry to float32).
  :func:`diffusers_alphas_cumprod` reproduces it bit for bit; the DPM-Solver++ sampler uses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from pixart.errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def check_sampling_steps(sampling_steps: int) -> int:
    """Return ``sampling_steps`` as an int, or raise InputError unless it is an integer in [1, 1000]."""
    if isinstance(sampling_steps, bool) or int(sampling_steps) != sampling_steps:
        raise InputError(f"number of sampling steps must be an integer, got {sampling_steps!r}")
    if not 1 <= sampling_steps <= NUM_TRAIN_TIMESTEPS:
        raise InputError(
            f"number of sampling steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {sampling_steps}"
        )
    return int(sampling_steps)


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Float64 betas, shape (num_timesteps,), as improved-DDPM's ``get_named_beta_schedule("linear", n)``.

    The end points are scaled by ``1000 / n`` so the schedule keeps its shape for any n; for
    PixArt's n = 1000 this is plainly 1e-4 -> 0.02.
    """
    scale = NUM_TRAIN_TIMESTEPS / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def diffusers_alphas_cumprod() -> np.ndarray:
    """Float32 alphas_cumprod, shape (1000,), as diffusers' ``beta_schedule="linear"``.

    Reproduces ``torch.linspace(1e-4, 0.02, 1000, dtype=float32)`` on CPU: a float32 step, the
    first half filled as ``start + step * i`` and the second as ``end - step * (n - 1 - i)``,
    each rounded once (torch's kernels fuse the multiply-add).  In float64 both are exact
    for these magnitudes, so one cast gives the same single rounding.  (``np.linspace`` in
    float32 differs from torch by 1 ulp in about a third of the entries.)
    """
    n = NUM_TRAIN_TIMESTEPS
    start, end = np.float32(BETA_START), np.float32(BETA_END)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n)
    betas = np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i))
    betas = betas.astype(np.float32)
    alphas = np.float32(1.0) - betas
    # torch.cumprod on CPU multiplies in float64 and rounds each partial product to float32.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> np.ndarray:
    """Timesteps kept by improved-DDPM's respacing, ascending int64 array (``respace.space_timesteps``).

    The ``num_timesteps`` original steps are cut into ``len(section_counts)`` near-equal
    sections and ``section_counts[i]`` evenly strided steps (first and last included) are
    kept from section i.  ``section_counts`` is an int, a sequence of ints, or a string of
    comma-separated ints such as ``"8"`` or ``"10,15,20"``.  (The reference's ``"ddimN"``
    integer-stride form is not used by PixArt and not supported.)

    Example: ``space_timesteps(1000, "8")`` -> [0, 143, 285, 428, 571, 714, 856, 999].
    """
    if isinstance(section_counts, str):
        section_counts = [int(part) for part in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        # Accumulated float position and Python's round (half to even), exactly as the
        # reference, so the kept set is identical for every count.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return np.array(sorted(set(kept)), dtype=np.int64)


@dataclass(frozen=True)
class DiffusionSchedule:
    """Float64 tables of a discrete Gaussian diffusion, indexed by step index 0..N-1.

    Mirrors improved-DDPM's ``GaussianDiffusion.__init__``.  For a respaced diffusion
    (``SpacedDiffusion``) index i stands for the original timestep ``timesteps[i]``, which is
    what the model is called with; all other tables are indexed by i.
    """

    timesteps: np.ndarray  # (N,) int64, original timestep of each index ("timestep_map")
    betas: np.ndarray  # (N,)
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray  # alphas_cumprod of the previous *kept* step, 1 at index 0
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray  # variance of q(x_{i-1} | x_i, x_0); 0 at index 0
    posterior_log_variance_clipped: np.ndarray  # log of it, index 0 takes index 1's value
    posterior_mean_coef1: np.ndarray  # posterior mean = coef1 * x_0 + coef2 * x_i
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray, timesteps: Optional[np.ndarray] = None) -> "DiffusionSchedule":
        """Build all tables from float64 betas (N,); ``timesteps`` defaults to 0..N-1."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        n = betas.shape[0]
        timesteps = np.arange(n, dtype=np.int64) if timesteps is None else np.asarray(timesteps, np.int64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at index 0; improved-DDPM takes index 1's value there so
        # the log stays finite.  A one-step schedule has no index 1: its only posterior is a
        # point mass (log variance -inf), which the sampler never uses since it adds no noise
        # at the last step.
        with np.errstate(divide="ignore"):
            posterior_log_variance_clipped = np.log(
                np.append(posterior_variance[1], posterior_variance[1:]) if n > 1 else posterior_variance
            )
        return cls(
            timesteps=timesteps,
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            log_betas=np.log(betas),
        )

    @property
    def num_timesteps(self) -> int:
        """Steps of this diffusion: 1000 for training, the sampling steps for a respaced one."""
        return int(self.betas.shape[0])


def training_schedule() -> DiffusionSchedule:
    """The full 1000-step linear schedule PixArt trains with (official ``IDDPM(str(1000))``)."""
    return DiffusionSchedule.from_betas(linear_betas())


def respaced_schedule(sampling_steps: int) -> DiffusionSchedule:
    """The official ``IDDPM(str(sampling_steps))`` sampling diffusion: ``SpacedDiffusion`` over the kept steps.

    Keeps ``space_timesteps(1000, sampling_steps)`` of the linear training schedule and gives kept
    step i the beta that makes its alphas_cumprod equal the base value at that timestep:
    ``beta_i = 1 - abar[t_i] / abar[t_{i-1}]`` (abar before the first kept step is 1).  The
    tables are then rebuilt from these betas, as the reference does.
    """
    sampling_steps = check_sampling_steps(sampling_steps)
    kept = space_timesteps(NUM_TRAIN_TIMESTEPS, sampling_steps)
    kept_alphas_cumprod = np.cumprod(1.0 - linear_betas())[kept]
    previous = np.append(1.0, kept_alphas_cumprod[:-1])
    return DiffusionSchedule.from_betas(1.0 - kept_alphas_cumprod / previous, timesteps=kept)
