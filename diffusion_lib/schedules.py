"""Noise schedules β_t and their respacing onto a shorter timestep subsequence.

All schedule arithmetic is float64: ᾱ_t at T=1000 reaches ~4e-5 and 1 - ᾱ differences of
neighbouring steps lose digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete forward process q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I), t = 0…T-1."""

    betas: torch.Tensor  # float64, shape (T,)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = ∏_{s≤t} (1 - β_s) (Ho et al. 2020, eq. 4)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def snr(self) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021)."""
        a = self.alphas_cumprod
        return a / (1.0 - a)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, §4: β linear from 1e-4 to 0.02 at T=1000, rescaled for other T (as improved-diffusion)."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make_schedule(name: str, num_timesteps: int) -> NoiseSchedule:
    if name not in _SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(_SCHEDULES)}")
    return NoiseSchedule(betas=_SCHEDULES[name](num_timesteps))


def spaced_timesteps(num_timesteps: int, nfe: int) -> torch.Tensor:
    """`nfe` evenly spaced original timesteps from 0 to T-1, both ends kept (improved-diffusion's
    `space_timesteps` with one section)."""
    if not 1 <= nfe <= num_timesteps:
        raise ValueError(f"nfe must be in [1, {num_timesteps}], got {nfe}")
    if nfe == 1:
        return torch.tensor([num_timesteps - 1])
    stride = (num_timesteps - 1) / (nfe - 1)
    return torch.tensor([round(i * stride) for i in range(nfe)], dtype=torch.long)


@dataclass(frozen=True)
class RespacedSchedule:
    """A schedule over a subsequence of timesteps whose betas are recomputed from ᾱ of the kept
    steps: β'_i = 1 - ᾱ_{t_i} / ᾱ_{t_{i-1}} (Nichol & Dhariwal 2021, §4; improved-diffusion
    `respace.py`). The marginals q(x_{t_i} | x_0) are unchanged, so a model trained on the full
    chain is used as is; `timesteps[i]` is the original index the model is called with."""

    schedule: NoiseSchedule
    timesteps: torch.Tensor  # long, shape (nfe,), increasing original indices


def respace(schedule: NoiseSchedule, nfe: int) -> RespacedSchedule:
    timesteps = spaced_timesteps(schedule.num_timesteps, nfe)
    kept = schedule.alphas_cumprod[timesteps]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    return RespacedSchedule(NoiseSchedule(betas=1.0 - kept / previous), timesteps)
