"""The forward process q(x_t | x_0) and the conversions between what the network predicts
(ε, x0 or v) and the quantities the loss and the samplers need."""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast to `like`'s shape (B, 1, 1, …)."""
    return values[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. 2020, eq. 4), with the network predicting `prediction`."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", device: torch.device | str = "cpu"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {prediction!r}; choose one of {PREDICTIONS}")
        self.schedule = schedule
        self.prediction = prediction
        alphas_cumprod = schedule.alphas_cumprod
        # Kept in float64 and cast per use: indexing then casting keeps every ᾱ_t exact to float32.
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().to(device)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt().to(device)
        self.snr = schedule.snr.to(device)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: ε, x_0, or v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022, §4)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return _at(self.sqrt_alphas_cumprod, t, x0) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """ε̂ from the network output, so one sampler serves every prediction target."""
        if self.prediction == "eps":
            return output
        a = _at(self.sqrt_alphas_cumprod, t, x_t)
        s = _at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "x0":
            return (x_t - a * output) / s
        return a * output + s * x_t  # ε = √ᾱ v + √(1-ᾱ) x_t

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15)."""
        return (x_t - _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _at(self.sqrt_alphas_cumprod, t, x_t)
