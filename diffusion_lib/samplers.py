"""DDPM ancestral and DDIM sampling on a respaced timestep subsequence.

Both samplers run on `respace(schedule, nfe)`: the kept steps' betas are recomputed from their
ᾱ (see `schedules.respace`), so each of the `nfe` steps is an exact step of a shorter
Markov chain with the same marginals, not a full-chain step applied over a stride.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .data import float_to_uint8
from .diffusion import GaussianDiffusion
from .schedules import NoiseSchedule, respace

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")


def _randn(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def reverse_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: float,
    a_prev: float,
    *,
    sampler: str,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One step x_t -> x_prev of a chain whose cumulative products are ᾱ_t = `a_t`, ᾱ_prev = `a_prev`.

    `noise` ~ N(0, I) is used where the step is stochastic (DDPM, or DDIM with η > 0).
    """
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    if sampler == "ddpm":
        # Posterior q(x_prev | x_t, x_0) (Ho et al. 2020, eqs. 6-7) with β = 1 - ᾱ_t/ᾱ_prev.
        beta = 1 - a_t / a_prev
        mean = (beta * a_prev**0.5 / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta) ** 0.5 / (1 - a_t)) * x
        std = (beta * (1 - a_prev) / (1 - a_t)) ** 0.5
    elif sampler == "ddim":
        # Song et al. 2021, eq. 12, with σ_t(η) from eq. 16.
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return mean + std * noise if std > 0 and noise is not None else mean


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    nfe: int = 50,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    clip_x0: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw samples from x_T ~ N(0, I) with `nfe` calls of `eps_fn(x_t, t)`.

    `t` passed to `eps_fn` is a LongTensor of original timestep indices (0…T−1).
    `clip_x0` clamps x̂_0 to [-1, 1] at every step, as for images in [-1, 1].
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    spaced = respace(schedule, nfe)
    alphas_cumprod = spaced.schedule.alphas_cumprod.tolist()  # float64 ᾱ of the kept steps
    x = _randn(shape, generator, device, dtype)
    for i in reversed(range(nfe)):
        t = torch.full((shape[0],), int(spaced.timesteps[i]), device=device, dtype=torch.long)
        eps = eps_fn(x, t).to(dtype)
        noise = _randn(shape, generator, device, dtype) if i > 0 and (sampler == "ddpm" or eta > 0) else None
        a_prev = alphas_cumprod[i - 1] if i > 0 else 1.0
        x = reverse_step(x, eps, alphas_cumprod[i], a_prev, sampler=sampler, eta=eta, noise=noise, clip_x0=clip_x0)
    return x


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    num_images: int,
    *,
    sampler: str,
    nfe: int,
    eta: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    autocast: Optional[torch.autocast] = None,
) -> torch.Tensor:
    """`num_images` uint8 (N, 3, 32, 32) images from a network predicting `diffusion.prediction`."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return diffusion.eps_from_output(x, t, model(x, t).float())

    batches = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        x = sample(
            eps_fn,
            diffusion.schedule,
            (n, 3, 32, 32),
            sampler=sampler,
            nfe=nfe,
            eta=eta,
            generator=generator,
            device=device,
        )
        batches.append(float_to_uint8(x))
    return torch.cat(batches)
