"""Shared fixtures and helpers: the ../shared material (skipping where absent), tiny configs
and spec files, a stand-in feature extractor for FID plumbing tests, and trainer factories that
hand the Trainer parts of the test's choosing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One BLAS thread per process: tests run beside Ray workers and subprocesses on 2 cores, where
# OpenBLAS's default of a thread per core, oversubscribed, slows the FID linear algebra 10×.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from diffusion_lib.build import create_model_and_diffusion
from diffusion_lib.config import RunConfig
from diffusion_lib.data import load_dataset
from diffusion_lib.trainer import Trainer

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
    return RunConfig.from_dict(raw)


def write_spec(tmp_path: Path, **fields) -> Path:
    """A sweep spec over TINY_RUN, stored under tmp_path/runs, with `fields` set."""
    spec = {"base": TINY_RUN, "metric": "train/loss", "storage": str(tmp_path / "runs"), "name": "tiny", **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trainer_with_parts(config: RunConfig, run_dir: Path, *, trainer_class: type = Trainer, loss_class: type | None = None, **kwargs) -> Trainer:
    """A CPU Trainer built the way `create_trainer` builds one, with a Trainer subclass or a loss
    class of the test's choosing; FID is handed the stand-in feature extractor."""
    torch.manual_seed(config.train.seed)
    data = load_dataset(config.data)
    model, diffusion, default_loss = create_model_and_diffusion(config, torch.device("cpu"))
    if config.fid.num_samples or config.fid.final_num_samples:
        from diffusion_lib.metrics.fid import reference_statistics

        kwargs.setdefault("features", StandInFeatures())
        kwargs.setdefault("fid_reference", reference_statistics(data, kwargs["features"], config.fid.ref_num_images, config.fid.cache_dir))
    loss = loss_class(diffusion, config.loss.weighting, config.loss.minsnr_gamma) if loss_class else default_loss
    return trainer_class(config, run_dir, model=model, diffusion=diffusion, loss=loss, data=data, **kwargs)


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


def trainer_with_standin_fid(config: RunConfig, run_dir: Path, **kwargs) -> Trainer:
    """The product's trainer, handed the stand-in feature extractor in place of Inception."""
    from diffusion_lib.build import create_trainer

    return create_trainer(config, run_dir, features=StandInFeatures(), **kwargs)


def run_sweep_with_standin_fid(spec, *test_modules):
    """A real Ray sweep in this process with the stand-in extractor in the launcher (the sweep's one
    reference pass: asserted) and in every trial; `test_modules` ship to the workers by value."""
    import ray

    from sweeps.runner import run_sweep

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for module in (sys.modules[__name__], *test_modules):
            ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import tests
        driver_features = StandInFeatures()
        results = run_sweep(spec, make_trainer=trainer_with_standin_fid, features=driver_features)
    finally:
        ray.shutdown()
    assert not results.errors
    assert driver_features.calls == 1  # the sweep's one reference pass, in the launching process
    return results


@pytest.fixture
def standin_features() -> StandInFeatures:
    return StandInFeatures()


@pytest.fixture(autouse=True)
def _no_weights_from_the_environment(monkeypatch):
    """Tests say which FID weights they use; a SWEEP_FID_WEIGHTS in the shell must not leak in."""
    monkeypatch.delenv("SWEEP_FID_WEIGHTS", raising=False)
