"""The denoising diagnostic, drawn from a checkpoint (research notes, E1): rows of x0 | x_t | x̂0
at t ∈ {0, T/4, T/2, 3T/4, T−1} on real training images. (The report's sample grids are the ones
the milestones recorded, copied: `analysis/plots.py`.)"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.utils

from diffusion_lib.build import create_diffusion, create_model
from diffusion_lib.checkpoint import checkpoint_config, load_checkpoint
from diffusion_lib.config import RunConfig
from diffusion_lib.data import float_to_uint8, load_dataset, uint8_to_float
from diffusion_lib.diffusion import GaussianDiffusion
from diffusion_lib.run_log import save_png

NOISE_SEED = 0  # the diagnostic's noise: the same x_t at every analysis


def load_ema(checkpoint: Path) -> tuple[RunConfig, torch.nn.Module, GaussianDiffusion]:
    """The run config, the EMA network (eval mode, CPU) and its diffusion, from a checkpoint."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state)
    model = create_model(config.model)
    model.load_state_dict(state["ema"])
    return config, model.eval(), create_diffusion(config.diffusion)


@torch.no_grad()
def denoising_diagnostic(checkpoint: Path, out: Path, num_images: int = 4, seed: int = NOISE_SEED) -> None:
    """One row per t: for each image x0, then x_t = q_sample(x0, t), then x̂0 from the EMA model."""
    config, model, diffusion = load_ema(checkpoint)
    images = load_dataset(config.data).images[:num_images]
    x0 = uint8_to_float(images)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    last = diffusion.num_timesteps - 1
    tiles = []
    for t_value in [0, round(last / 4), round(last / 2), round(3 * last / 4), last]:
        t = torch.full((num_images,), t_value, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, noise)
        eps = diffusion.eps_from_output(x_t, t, model(x_t, t))
        x0_hat = diffusion.x0_from_eps(x_t, t, eps).clamp(-1, 1)
        for triple in zip(x0, x_t.clamp(-1, 1), x0_hat):
            tiles += list(triple)
    grid = torchvision.utils.make_grid(float_to_uint8(torch.stack(tiles)).float() / 255, nrow=3 * num_images, padding=2)
    save_png(grid, out)
