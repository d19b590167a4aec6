"""The training loss: per-sample MSE on the prediction target, weighted per timestep.

Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
§3.4) clamps the effective x_0-space weight at γ. Expressed on each target's own MSE:
    ε-target:  min(SNR_t, γ) / SNR_t
    x0-target: min(SNR_t, γ)
    v-target:  min(SNR_t, γ) / (SNR_t + 1)
"""

from __future__ import annotations

import torch
from torch import nn

from .diffusion import GaussianDiffusion


def minsnr_weight(snr: torch.Tensor, minsnr_gamma: float, prediction: str) -> torch.Tensor:
    clamped = torch.clamp(snr, max=minsnr_gamma)
    if prediction == "eps":
        return clamped / snr
    if prediction == "x0":
        return clamped
    if prediction == "v":
        return clamped / (snr + 1.0)
    raise ValueError(f"unknown prediction target {prediction!r}")


class DiffusionLoss:
    """L = w(t) · ‖f_θ(x_t, t) − target‖² averaged over pixels, per sample."""

    def __init__(self, diffusion: GaussianDiffusion, weighting: str = "constant", minsnr_gamma: float = 5.0):
        if weighting == "constant":
            weights = torch.ones_like(diffusion.snr)
        elif weighting == "min_snr":
            weights = minsnr_weight(diffusion.snr, minsnr_gamma, diffusion.prediction)
        else:
            raise ValueError(f"unknown loss weighting {weighting!r}")
        self.diffusion = diffusion
        self.weights = weights.float()

    def per_sample(self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """w(t) · MSE(f_θ(x_t, t), target) for each sample (the training objective)."""
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = model(x_t, t)
        target = self.diffusion.target(x0, noise, t)
        mse = (output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.dim())))
        return self.weights[t] * mse


def eps_mse(
    model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Unweighted ε-space MSE per sample, ‖ε̂_θ(x_t, t) − ε‖² (Ho et al. 2020, eq. 14), whatever the
    network predicts and however training weights it: one objective on which every run's
    curvature can be compared."""
    x_t = diffusion.q_sample(x0, t, noise)
    eps = diffusion.eps_from_output(x_t, t, model(x_t, t))
    return (eps.float() - noise.float()).pow(2).mean(dim=tuple(range(1, x0.dim())))
