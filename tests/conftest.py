"""Shared fixtures: the ../shared material (skipping where absent), tiny configs, a stand-in
feature extractor for FID plumbing tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lib.config import RunConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SWEEP_SHARED_DIR", REPO.parent / "shared"))
CIFAR_ROOT = SHARED / "data"
FID_WEIGHTS = SHARED / "fid" / "pt_inception-2015-12-05-6726825d.pth"

needs_cifar = pytest.mark.skipif(
    not (CIFAR_ROOT / "cifar-10-batches-py" / "data_batch_1").is_file(),
    reason=f"the CIFAR-10 subset is not at {CIFAR_ROOT} (../shared is absent)",
)
needs_fid_weights = pytest.mark.skipif(
    not FID_WEIGHTS.is_file(), reason=f"the FID Inception weights are not at {FID_WEIGHTS} (../shared is absent)"
)


# A run small enough to train in seconds on a CPU.
TINY_RUN = {
    "data": {"name": "shapes", "num_images": 64},
    "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 100},
    "train": {"total_steps": 20, "batch_size": 8},
    "ema": {"decay": 0.8},
    "eval": {"every": 10, "nfe": 5, "grid_size": 4, "batch_size": 16},
    "fid": {"num_samples": 0, "final_num_samples": 0},
    "curvature": {"probes": 0, "batch_size": 4},
}


def tiny_config(**sections) -> RunConfig:
    """TINY_RUN with `sections` overriding it, e.g. train={"total_steps": 30}."""
    raw = {name: dict(values) for name, values in TINY_RUN.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


class StandInFeatures:
    """A fixed random projection of 8×8-pooled pixels: cheap, deterministic features for tests
    about FID plumbing rather than about the Inception network."""

    def __init__(self, dims: int = 16):
        self.projection = torch.randn(3 * 8 * 8, dims, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.cpu().double() / 255, 8).flatten(1)
        return (pooled @ self.projection).numpy()


@pytest.fixture
def standin_features() -> StandInFeatures:
    return StandInFeatures()


@pytest.fixture(autouse=True)
def _no_weights_from_the_environment(monkeypatch):
    """Tests say which FID weights they use; a SWEEP_FID_WEIGHTS in the shell must not leak in."""
    monkeypatch.delenv("SWEEP_FID_WEIGHTS", raising=False)
