"""DDPM ancestral and DDIM sampling on a respaced timestep subsequence.

Both samplers run on `respace(schedule, nfe)`: the kept steps' betas are recomputed from their
ᾱ (see `schedules.respace`), so each of the `nfe` steps is an exact step of a shorter
Markov chain with the same marginals, not a full-chain step applied over a stride.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedules import NoiseSchedule, respace

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")


def _randn(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


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
    alphas_cumprod = spaced.schedule.alphas_cumprod  # float64, ᾱ of the kept steps
    betas = spaced.schedule.betas
    x = _randn(shape, generator, device, dtype)
    for i in reversed(range(nfe)):
        a_t = alphas_cumprod[i].item()
        a_prev = alphas_cumprod[i - 1].item() if i > 0 else 1.0
        t = torch.full((shape[0],), int(spaced.timesteps[i]), device=device, dtype=torch.long)
        eps = eps_fn(x, t).to(dtype)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if sampler == "ddpm":
            # Posterior q(x_{t-1} | x_t, x_0) of the respaced chain (Ho et al. 2020, eqs. 6-7).
            beta = betas[i].item()
            mean = (beta * a_prev**0.5 / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta) ** 0.5 / (1 - a_t)) * x
            std = (beta * (1 - a_prev) / (1 - a_t)) ** 0.5
        else:
            # Song et al. 2021, eq. 12, with σ_t(η) from eq. 16.
            std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        x = mean + std * _randn(shape, generator, device, dtype) if i > 0 and std > 0 else mean
    return x
