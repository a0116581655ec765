"""Samplers and schedules in pixart/diffusion against diffusers and against the formulas written out plainly.

Per-step tests feed the same random (sample, model output) pair to both sides at every
step, so differences do not accumulate along the chain.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from pixart.diffusion.samplers import (
    DDIMSampler,
    DPMSolverSampler,
    IDDPMSampler,
    make_sampler,
)
from pixart.diffusion.schedule import (
    diffusers_alphas_cumprod,
    linear_betas,
    respaced_schedule,
    space_timesteps,
)

SHAPE = (2, 4, 8, 8)

# PixArt-Sigma's shipped scheduler_config.json, written out in full (final_sigmas_type is not
# in it, so diffusers' default "zero" applies; spelled out here so a default change shows).
PIXART_SIGMA_DPM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
)


def ddim_config(**overrides):
    """diffusers DDIMScheduler config matching the official DDIM where it can: eta 0 is passed
    to step(); no x0 clipping (PixArt samples with clip_denoised=False); alpha_prev = 1
    after the last step, as the respaced diffusion's alphas_cumprod_prev."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        timestep_spacing="linspace",
        rescale_betas_zero_snr=False,
    )
    config.update(overrides)
    return config


def max_rel_diff(ours, reference):
    """max |ours - reference| relative to max |reference|."""
    return float(np.abs(ours.astype(np.float64) - reference).max() / np.abs(reference).max())


def random_pair(rng):
    """A (sample, eps) pair of standard normal float32 arrays of SHAPE."""
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)


def plain_alphas_cumprod():
    """abar_t = prod_{s<=t} (1 - beta_s), beta linear 1e-4 -> 0.02 over 1000 steps, float64."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


# ---------------------------------------------------------------------------------------- schedule


def test_linear_betas_are_the_official_float64_schedule():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_array_equal(betas, np.linspace(1e-4, 0.02, 1000))


def test_diffusers_alphas_cumprod_reproduces_diffusers():
    reference = DPMSolverMultistepScheduler(**PIXART_SIGMA_DPM_CONFIG).alphas_cumprod.numpy()
    ours = diffusers_alphas_cumprod()
    assert ours.dtype == np.float32
    # Bit-exact on CPUs whose torch.linspace fuses multiply-adds (every one tried); allow 1 ulp.
    ulps = np.abs(ours.view(np.int32) - reference.view(np.int32))
    assert ulps.max() <= 1
    # The official float64 schedule is the same schedule up to float32 rounding.
    assert max_rel_diff(ours, plain_alphas_cumprod()) < 2e-6


def test_space_timesteps_official_examples():
    np.testing.assert_array_equal(space_timesteps(1000, "8"), [0, 143, 285, 428, 571, 714, 856, 999])
    np.testing.assert_array_equal(space_timesteps(1000, 8), space_timesteps(1000, [8]))
    np.testing.assert_array_equal(space_timesteps(1000, 1), [0])
    np.testing.assert_array_equal(space_timesteps(1000, 1000), np.arange(1000))
    # Three sections of 100 steps, strided into 10, 15 and 20 steps.
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45
    np.testing.assert_array_equal(sections[:10], np.round(np.arange(10) * 11.0))
    assert sections[10] == 100 and sections[24] == 199 and sections[25] == 200 and sections[-1] == 299
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(1000, 1001)


def test_samplers_call_the_respaced_timesteps_in_descending_order():
    expected = [999, 856, 714, 571, 428, 285, 143, 0]
    for name in ("ddim", "iddpm"):
        np.testing.assert_array_equal(make_sampler(name, 8).timesteps, expected)


@pytest.mark.parametrize("sampling_steps", [10, 20, 25, 50])
def test_space_timesteps_equal_diffusers_linspace_timesteps(sampling_steps):
    scheduler = DDIMScheduler(**ddim_config())
    scheduler.set_timesteps(sampling_steps)
    np.testing.assert_array_equal(DDIMSampler(sampling_steps).timesteps, scheduler.timesteps.numpy())


def test_respaced_schedule_keeps_the_base_alphas_cumprod():
    schedule = respaced_schedule(8)
    base = plain_alphas_cumprod()
    np.testing.assert_allclose(schedule.alphas_cumprod, base[schedule.timesteps], rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev[1:], base[schedule.timesteps[:-1]], rtol=1e-12)
    assert schedule.alphas_cumprod_prev[0] == 1.0


# ------------------------------------------------------------------------------------ DPM-Solver++


@pytest.mark.parametrize("sampling_steps", [1, 2, 5, 14, 15, 20, 25])
def test_dpm_solver_matches_diffusers_per_step(sampling_steps):
    reference = DPMSolverMultistepScheduler(**PIXART_SIGMA_DPM_CONFIG)
    reference.set_timesteps(sampling_steps)
    sampler = DPMSolverSampler(sampling_steps)
    np.testing.assert_array_equal(sampler.timesteps, reference.timesteps.numpy())
    rng = np.random.default_rng(sampling_steps)
    worst = 0.0
    for index, t in enumerate(sampler.timesteps):
        sample, eps = random_pair(rng)
        expected = reference.step(torch.from_numpy(eps), int(t), torch.from_numpy(sample)).prev_sample.numpy()
        ours = sampler.step(eps, index, sample)
        assert ours.dtype == np.float32 and ours.shape == SHAPE
        worst = max(worst, max_rel_diff(ours, expected))
    print(f"dpm {sampling_steps} steps: max relative difference to diffusers {worst:.2e}")
    assert worst <= 1e-6


def test_dpm_solver_matches_diffusers_over_a_whole_chain():
    """A toy linear "model" closes the loop, so differences could accumulate along the chain."""
    rng = np.random.default_rng(0)
    weight = (0.3 * rng.standard_normal((4, 4)) + 0.8 * np.eye(4)).astype(np.float32)
    bias = rng.standard_normal((1,) + SHAPE[1:]).astype(np.float32)

    def model(x, t):
        return (np.einsum("oc,bchw->bohw", weight, x) + bias * np.float32(t / 1000)).astype(np.float32)

    reference = DPMSolverMultistepScheduler(**PIXART_SIGMA_DPM_CONFIG)
    reference.set_timesteps(20)
    sampler = make_sampler("dpm", 20)
    ours = expected = rng.standard_normal(SHAPE).astype(np.float32)
    for index, t in enumerate(sampler.timesteps):
        ours = sampler.step(model(ours, t), index, ours)
        eps = torch.from_numpy(model(expected, t))
        expected = reference.step(eps, int(t), torch.from_numpy(expected)).prev_sample.numpy()
    assert max_rel_diff(ours, expected) <= 1e-6


def test_dpm_solver_steps_must_run_in_order():
    sampler = DPMSolverSampler(5)
    sample, eps = random_pair(np.random.default_rng(0))
    sampler.step(eps, 0, sample)
    with pytest.raises(ValueError, match="in order"):
        sampler.step(eps, 2, sample)
    sampler.step(eps, 0, sample)  # index 0 restarts


# -------------------------------------------------------------------------------------------- DDIM


def run_ddim_against(reference, sampler, reference_timesteps, steps_to_compare, seed):
    """Worst relative difference of sampler.step vs reference.step (eta 0) over steps_to_compare."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for index in steps_to_compare:
        sample, eps = random_pair(rng)
        expected = reference.step(
            torch.from_numpy(eps), int(reference_timesteps[index]), torch.from_numpy(sample), eta=0.0
        ).prev_sample.numpy()
        worst = max(worst, max_rel_diff(sampler.step(eps, index, sample), expected))
    return worst


@pytest.mark.parametrize("sampling_steps", [10, 20, 25, 50])
def test_ddim_matches_diffusers_linspace_where_the_targets_agree(sampling_steps):
    """diffusers' linspace timesteps are the official ones, but it steps to t - 1000 // N
    instead of the next used timestep; both agree only on some steps (the last one always)."""
    reference = DDIMScheduler(**ddim_config())
    reference.set_timesteps(sampling_steps)
    sampler = DDIMSampler(sampling_steps)
    timesteps = sampler.timesteps
    next_used = np.append(timesteps[1:], -1)
    diffusers_target = np.maximum(timesteps - 1000 // sampling_steps, -1)
    agree = np.nonzero(next_used == diffusers_target)[0]
    assert agree[-1] == sampling_steps - 1 and len(agree) < sampling_steps
    worst = run_ddim_against(reference, sampler, timesteps, agree, sampling_steps)
    print(f"ddim {sampling_steps} steps: {len(agree)} agreeing steps, max relative difference {worst:.2e}")
    # Not 1e-6: diffusers' float32 1 - abar_0 (about 1e-4) carries a relative error of up to
    # 6e-4, which moves the last step's x0 by about 1e-6 of its size; ours is float64.
    assert worst <= 2e-6


def test_ddim_matches_diffusers_at_1000_steps():
    """With every timestep used, diffusers' DDIM and the official one take the same steps."""
    reference = DDIMScheduler(**ddim_config())
    reference.set_timesteps(1000)
    sampler = DDIMSampler(1000)
    np.testing.assert_array_equal(sampler.timesteps, reference.timesteps.numpy())
    worst = run_ddim_against(reference, sampler, sampler.timesteps, range(1000), 1000)
    print(f"ddim 1000 steps: max relative difference {worst:.2e} (float64 vs float32 schedule)")
    assert worst <= 1e-5


@pytest.mark.parametrize("sampling_steps", [7, 10, 30])
def test_ddim_matches_diffusers_run_on_the_respaced_schedule(sampling_steps):
    """diffusers' DDIM given the respaced betas as its own N-step training schedule
    (leading spacing, offset 0: steps N-1, ..., 0, each to the previous index) is the official
    respaced DDIM.  Its float32 cumprod of the betas costs some precision, hence 1e-5."""
    schedule = respaced_schedule(sampling_steps)
    reference = DDIMScheduler(
        **ddim_config(num_train_timesteps=sampling_steps, trained_betas=schedule.betas, timestep_spacing="leading")
    )
    reference.set_timesteps(sampling_steps)
    np.testing.assert_array_equal(reference.timesteps.numpy(), np.arange(sampling_steps)[::-1])
    sampler = DDIMSampler(sampling_steps)
    worst = run_ddim_against(reference, sampler, reference.timesteps.numpy(), range(sampling_steps), sampling_steps)
    print(f"ddim {sampling_steps} steps vs diffusers on the respaced schedule: max relative difference {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("sampling_steps", [7, 30])
def test_ddim_matches_the_formulas(sampling_steps):
    alphas_cumprod = plain_alphas_cumprod()
    sampler = DDIMSampler(sampling_steps)
    rng = np.random.default_rng(sampling_steps)
    worst = 0.0
    timesteps = list(sampler.timesteps)
    for index, t in enumerate(timesteps):
        sample, eps = random_pair(rng)
        x, e = sample.astype(np.float64), eps.astype(np.float64)
        alpha = alphas_cumprod[t]
        alpha_prev = alphas_cumprod[timesteps[index + 1]] if index + 1 < sampling_steps else 1.0
        x0 = (x - np.sqrt(1 - alpha) * e) / np.sqrt(alpha)
        expected = np.sqrt(alpha_prev) * x0 + np.sqrt(1 - alpha_prev) * e
        worst = max(worst, max_rel_diff(sampler.step(eps, index, sample), expected))
    print(f"ddim {sampling_steps} steps vs float64 formulas: max relative difference {worst:.2e}")
    assert worst <= 1e-6


# ------------------------------------------------------------------------------------------- IDDPM


@pytest.mark.parametrize("sampling_steps", [7, 30])
def test_iddpm_matches_the_formulas(sampling_steps):
    alphas_cumprod = plain_alphas_cumprod()
    noise_rng = np.random.default_rng(100 + sampling_steps)
    noises = [noise_rng.standard_normal(SHAPE).astype(np.float32) for _ in range(sampling_steps)]
    drawn = iter(noises)
    sampler = IDDPMSampler(sampling_steps, noise=lambda shape: next(drawn))
    rng = np.random.default_rng(sampling_steps)
    timesteps = list(sampler.timesteps)
    worst = 0.0
    for index, t in enumerate(timesteps):
        sample, eps = random_pair(rng)
        var_values = rng.uniform(-1, 1, SHAPE).astype(np.float32)
        x, e, v = sample.astype(np.float64), eps.astype(np.float64), var_values.astype(np.float64)
        # Respaced diffusion: beta_t from consecutive *used* timesteps.
        alpha = alphas_cumprod[t]
        alpha_prev = alphas_cumprod[timesteps[index + 1]] if index + 1 < sampling_steps else 1.0
        beta = 1 - alpha / alpha_prev
        x0 = (x - np.sqrt(1 - alpha) * e) / np.sqrt(alpha)
        mean = (beta * np.sqrt(alpha_prev) * x0 + (1 - alpha_prev) * np.sqrt(1 - beta) * x) / (1 - alpha)
        if t == 0:
            expected = mean
        else:
            posterior_variance = beta * (1 - alpha_prev) / (1 - alpha)
            frac = (v + 1) / 2
            log_variance = frac * np.log(beta) + (1 - frac) * np.log(posterior_variance)
            expected = mean + np.exp(0.5 * log_variance) * noises[index]
        model_output = np.concatenate([eps, var_values], axis=1)
        worst = max(worst, max_rel_diff(sampler.step(model_output, index, sample), expected))
    print(f"iddpm {sampling_steps} steps vs float64 formulas: max relative difference {worst:.2e}")
    assert worst <= 1e-5


def test_iddpm_is_reproducible_from_a_seed_and_adds_no_noise_at_t0():
    sample, eps = random_pair(np.random.default_rng(0))
    model_output = np.concatenate([eps, np.zeros_like(eps)], axis=1)

    def run(seed):
        sampler = make_sampler("iddpm", 4, noise=np.random.default_rng(seed))
        return [sampler.step(model_output, index, sample) for index in range(4)]

    first, again, other = run(1), run(1), run(2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    np.testing.assert_array_equal(first[-1], other[-1])  # last step (t = 0): the mean, no noise


# ---------------------------------------------------------------------------------- factory, input


def test_make_sampler_kinds_and_channels():
    kinds = (("dpm", DPMSolverSampler, 4), ("ddim", DDIMSampler, 4), ("iddpm", IDDPMSampler, 8))
    for name, cls, channels in kinds:
        sampler = make_sampler(name, 12)
        assert isinstance(sampler, cls)
        assert sampler.init_noise_sigma == 1.0
        assert sampler.model_channels(4) == channels
        assert sampler.sampling_steps == 12 and sampler.timesteps.dtype == np.int64


def test_make_sampler_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid choices: dpm, ddim, iddpm, lcm"):
        make_sampler("euler", 20)


@pytest.mark.parametrize("name", ["dpm", "ddim", "iddpm"])
@pytest.mark.parametrize("sampling_steps", [0, -3, 1001, 2.5])
def test_make_sampler_rejects_bad_step_counts(name, sampling_steps):
    with pytest.raises(ValueError, match="sampling steps"):
        make_sampler(name, sampling_steps)


def test_dpm_solver_rejects_1000_steps():
    with pytest.raises(ValueError, match="fewer than 1000"):
        make_sampler("dpm", 1000)


def test_step_rejects_wrong_model_channels_and_index():
    sample, eps = random_pair(np.random.default_rng(0))
    with pytest.raises(ValueError, match="model output of shape"):
        make_sampler("ddim", 5).step(np.concatenate([eps, eps], axis=1), 0, sample)
    with pytest.raises(ValueError, match="model output of shape"):
        make_sampler("iddpm", 5).step(eps, 0, sample)
    with pytest.raises(ValueError, match="step index"):
        make_sampler("ddim", 5).step(eps, 5, sample)


# ---------------------------------------------------------------------------------- LCM (PixArt-δ)

def lcm_scheduler():
    """diffusers' LCMScheduler with its defaults on PixArt's linear schedule (PixArt-LCM's config)."""
    from diffusers import LCMScheduler
    return LCMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", original_inference_steps=50, timestep_scaling=10.0)


@pytest.mark.parametrize("sampling_steps", [1, 2, 3, 4, 8, 50])
def test_lcm_timesteps_match_diffusers(sampling_steps):
    reference = lcm_scheduler()
    reference.set_timesteps(sampling_steps)
    np.testing.assert_array_equal(make_sampler("lcm", sampling_steps).timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("sampling_steps", [1, 2, 4, 8])
def test_lcm_steps_match_diffusers_with_the_same_noise(sampling_steps):
    """A whole chain: the model is a fixed function of the sample, the step noise is the same
    torch.randn stream on both sides; each step is compared from the same inputs."""
    reference = lcm_scheduler()
    reference.set_timesteps(sampling_steps)
    ours_noise, theirs_noise = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampler = make_sampler("lcm", sampling_steps, noise=lambda shape: torch.randn(shape, generator=ours_noise).numpy())
    rng = np.random.default_rng(sampling_steps)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    worst = 0.0
    for index, t in enumerate(reference.timesteps):
        eps = (np.tanh(sample) * 0.9 + 0.1 * rng.standard_normal(SHAPE)).astype(np.float32)
        expected = reference.step(torch.from_numpy(eps), t, torch.from_numpy(sample), generator=theirs_noise,
                                  return_dict=False)[0].numpy()
        ours = sampler.step(eps, index, sample)
        worst = max(worst, max_rel_diff(ours, expected))
        sample = expected
    assert worst <= 1e-6, worst
    print(f"lcm {sampling_steps} steps: max relative difference {worst:.2e}")


def test_lcm_boundary_condition():
    from pixart.diffusion.samplers import LCMSampler

    c_skip, c_out = LCMSampler.boundary_scalings(0)
    assert c_skip == 1.0 and c_out == 0.0  # at t = 0 the consistency function is the identity
    c_skip, c_out = LCMSampler.boundary_scalings(999)
    np.testing.assert_allclose([c_skip, c_out], [0.25 / (9990 ** 2 + 0.25), 9990 / (9990 ** 2 + 0.25) ** 0.5],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="at most 50"):
        make_sampler("lcm", 51)
