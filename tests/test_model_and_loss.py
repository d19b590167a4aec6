"""Min-SNR weights, parameter counts, and the research notes' two integration checks (E1)."""

import pytest
import torch

from diffusion_lib.diffusion import GaussianDiffusion
from diffusion_lib.losses import DiffusionLoss
from diffusion_lib.models.unet import UNetCifar32
from diffusion_lib.samplers import reverse_step
from diffusion_lib.schedules import make_schedule

T_CHOSEN = torch.tensor([0, 10, 100, 400, 999])


def snr_by_hand(schedule_name: str) -> torch.Tensor:
    # Independent of NoiseSchedule.snr: ᾱ by an explicit running product.
    betas = make_schedule(schedule_name, 1000).betas.tolist()
    out, running = [], 1.0
    for b in betas:
        running *= 1.0 - b
        out.append(running / (1.0 - running))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize(
    "prediction, formula",
    [
        ("eps", lambda snr, g: min(snr, g) / snr),
        ("x0", lambda snr, g: min(snr, g)),
        ("v", lambda snr, g: min(snr, g) / (snr + 1)),
    ],
)
def test_minsnr_weights_match_hang_et_al(schedule_name, prediction, formula):
    gamma = 5.0
    diffusion = GaussianDiffusion(make_schedule(schedule_name, 1000), prediction)
    weights = DiffusionLoss(diffusion, "min_snr", gamma).weights
    snr = snr_by_hand(schedule_name)
    for t in T_CHOSEN.tolist():
        expected = formula(snr[t].item(), gamma)
        assert weights[t].item() == pytest.approx(expected, rel=1e-5), (t, prediction)


def test_constant_weighting_is_one_everywhere():
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), "eps")
    assert torch.all(DiffusionLoss(diffusion, "constant").weights == 1)


def test_minsnr_downweights_low_noise_steps_for_eps():
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), "eps")
    weights = DiffusionLoss(diffusion, "min_snr", 5.0).weights
    assert weights[0] < 0.01 and weights[999] == pytest.approx(1.0)


@pytest.mark.parametrize("base_channels, notes_figure", [(32, 1.98e6), (64, 4 * 1.98e6)])
def test_parameter_counts_match_the_research_notes(base_channels, notes_figure):
    # Width 32: the notes' ≈1.98M. Width 64 (E7c): convolutions scale with width², so ≈4×.
    count = sum(p.numel() for p in UNetCifar32(base_channels).parameters())
    assert abs(count - notes_figure) / notes_figure < 0.10, count


def test_targets_and_conversions_are_consistent():
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 5, 50, 300, 700, 999])
    for prediction in ("eps", "x0", "v"):
        diffusion = GaussianDiffusion(make_schedule("cosine", 1000), prediction)
        x_t = diffusion.q_sample(x0, t, noise)
        perfect = diffusion.target(x0, noise, t)
        eps = diffusion.eps_from_output(x_t, t, perfect)
        torch.testing.assert_close(eps[1:], noise[1:], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(diffusion.x0_from_eps(x_t, t, eps)[:5], x0[:5], atol=2e-3, rtol=1e-3)


def test_unet_with_ddpm_loss_learns_to_denoise_a_fixed_batch():
    """E1 integration check 1: a few dozen optimiser steps on a fixed batch lower MSE(x̂0, x0)."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), "eps")
    loss = DiffusionLoss(diffusion)
    model = UNetCifar32(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, dropout=0.0)
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    t = torch.full((8,), 300)
    noise = torch.randn_like(x0)

    def reconstruction_mse() -> float:
        with torch.no_grad():
            x_t = diffusion.q_sample(x0, t, noise)
            x0_hat = diffusion.x0_from_eps(x_t, t, model(x_t, t))
            return torch.mean((x0_hat - x0) ** 2).item()

    before = reconstruction_mse()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        loss.per_sample(model, x0, t, noise).mean().backward()
        optimizer.step()
    assert reconstruction_mse() < 0.5 * before


def test_one_ddpm_step_with_perfect_eps_moves_toward_x0():
    """E1 integration check 2: one real DDPM reverse step driven by ε_true reduces MSE to x0."""
    torch.manual_seed(0)
    schedule = make_schedule("linear", 1000)
    diffusion = GaussianDiffusion(schedule, "eps")
    x0 = torch.rand(16, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x0)
    t = 500
    x_t = diffusion.q_sample(x0, torch.full((16,), t), noise)
    a = schedule.alphas_cumprod
    x_prev = reverse_step(x_t, noise, a[t].item(), a[t - 1].item(), sampler="ddpm", noise=torch.randn_like(x0))
    assert torch.mean((x_prev - x0) ** 2) < torch.mean((x_t - x0) ** 2)
