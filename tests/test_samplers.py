"""Sampler exactness against closed-form Gaussian oracles (see gaussian_oracle.py)."""

import pytest
import torch

from diffusion_lib.samplers import reverse_step, sample
from diffusion_lib.schedules import make_schedule, respace, spaced_timesteps

from gaussian_oracle import exact_output_moments, optimal_eps_fn

MU, SIGMA = 0.4, 0.3
NUM = 50_000  # scalars; Monte Carlo error of the moments ≈ 0.4%, against tolerances of 1.5–2%


def moments(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return x.mean().item(), x.std().item()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_full_chain_reproduces_the_data_moments(schedule_name, sampler):
    schedule = make_schedule(schedule_name, 1000)
    eps_fn = optimal_eps_fn(MU, SIGMA, schedule.alphas_cumprod)
    x = sample(
        eps_fn, schedule, (NUM,), sampler=sampler, nfe=1000, generator=torch.Generator().manual_seed(0), clip_x0=False
    )
    mean, std = moments(x)
    assert rel(mean, MU) < 0.02 and rel(std, SIGMA) < 0.02, (mean, std)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_50_step_sampler_matches_its_exact_moments(schedule_name, sampler):
    schedule = make_schedule(schedule_name, 1000)
    eps_fn = optimal_eps_fn(MU, SIGMA, schedule.alphas_cumprod)
    x = sample(
        eps_fn, schedule, (NUM,), sampler=sampler, nfe=50, generator=torch.Generator().manual_seed(1), clip_x0=False
    )
    exact_mean, exact_std = exact_output_moments(
        MU, SIGMA, schedule.alphas_cumprod, spaced_timesteps(1000, 50), sampler
    )
    mean, std = moments(x)
    assert rel(mean, exact_mean) < 0.015 and rel(std, exact_std) < 0.015, (mean, std, exact_mean, exact_std)


def strided_sample_without_respacing(eps_fn, schedule, shape, sampler, nfe, generator):
    """The classic bug: step over a strided grid but with each step's *original* β_t, as if the
    previous timestep were t-1 rather than the previous kept one."""
    timesteps = spaced_timesteps(schedule.num_timesteps, nfe)
    alphas_cumprod = schedule.alphas_cumprod
    x = torch.randn(shape, generator=generator)
    for i in reversed(range(nfe)):
        t = int(timesteps[i])
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[t - 1].item() if t > 0 else 1.0
        eps = eps_fn(x, torch.full((shape[0],), t))
        noise = torch.randn(shape, generator=generator) if i > 0 else None
        x = reverse_step(x, eps, a_t, a_prev, sampler=sampler, noise=noise, clip_x0=False)
    return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_moment_check_catches_a_sampler_without_respacing(sampler):
    schedule = make_schedule("linear", 1000)
    eps_fn = optimal_eps_fn(MU, SIGMA, schedule.alphas_cumprod)
    x = strided_sample_without_respacing(eps_fn, schedule, (NUM,), sampler, 50, torch.Generator().manual_seed(1))
    exact_mean, exact_std = exact_output_moments(
        MU, SIGMA, schedule.alphas_cumprod, spaced_timesteps(1000, 50), sampler
    )
    mean, std = moments(x)
    assert rel(mean, exact_mean) > 0.015 or rel(std, exact_std) > 0.015


def test_respacing_recomputes_betas_from_the_kept_alphas_cumprod():
    schedule = make_schedule("cosine", 1000)
    spaced = respace(schedule, 50)
    assert spaced.timesteps[0] == 0 and spaced.timesteps[-1] == 999 and len(spaced.timesteps) == 50
    torch.testing.assert_close(
        spaced.schedule.alphas_cumprod, schedule.alphas_cumprod[spaced.timesteps], rtol=1e-9, atol=0
    )
    assert not torch.allclose(spaced.schedule.betas, schedule.betas[spaced.timesteps])


def test_nfe_equal_to_t_keeps_the_original_betas():
    schedule = make_schedule("linear", 1000)
    spaced = respace(schedule, 1000)
    torch.testing.assert_close(spaced.schedule.betas, schedule.betas, rtol=1e-9, atol=1e-12)


def test_same_generator_seed_gives_the_same_samples():
    schedule = make_schedule("linear", 100)
    eps_fn = optimal_eps_fn(MU, SIGMA, schedule.alphas_cumprod)
    a = sample(eps_fn, schedule, (64,), nfe=10, generator=torch.Generator().manual_seed(3))
    b = sample(eps_fn, schedule, (64,), nfe=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
