"""Real Ray Tune sweeps on the CPU, in this process: grid, Optuna + ASHA, a crashing trial,
a GPU spec on a CPU-only cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from conftest import TINY_RUN
from sweeps.cli import app
from sweeps.spec import load_spec
from sweeps.runner import run_sweep

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()



def write_spec(tmp_path: Path, **fields) -> Path:
    spec = {"base": TINY_RUN, "metric": "train/loss", "storage": str(tmp_path / "runs"), "name": "tiny", **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: a second ray.init in a process that ran Tune can hang here."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_grid_sweep_reports_every_milestone_key(tmp_path, local_ray):
    spec = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 1e-3]}, "loss": {"grid": [{"weighting": "constant"}, {"weighting": "min_snr", "minsnr_gamma": 5}]}}))
    results = run_sweep(spec)
    assert len(results) == 4 and not results.errors
    frame = results.get_dataframe()
    assert {"step", "train/loss", "wall_time_s", "images_seen", "loss/t_bucket_0"} <= set(frame.columns)
    assert sorted(frame["config/optim.lr"]) == [1e-4, 1e-4, 1e-3, 1e-3]
    assert all(r.metrics["step"] == 20 for r in results)
    # One TensorBoard run (and trainer log) per trial, named by its searched values.
    experiment = Path(results.experiment_path)
    trial_dirs = sorted(p.name for p in experiment.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(trial_dirs) == 4 and any("minsnr_gamma=5" in d and "weighting=min_snr" in d for d in trial_dirs)
    for name in trial_dirs:
        assert list((experiment / name).glob("events.out.tfevents.*"))
        assert json.loads((experiment / name / "trial.json").read_text())["config"]["train.total_steps"] == 20


def test_optuna_with_asha_stops_the_clearly_worse_arm_early(tmp_path, local_ray):
    spec = load_spec(write_spec(
        tmp_path,
        base={**TINY_RUN, "train": {"total_steps": 60, "batch_size": 8}},
        search={"optim.lr": {"choice": [3e-3, 1e-8]}},  # 1e-8 cannot learn in 60 steps
        algorithm="optuna", seed=6, num_samples=6, max_concurrent=1,
        scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2},
    ))
    results = run_sweep(spec)
    assert len(results) == 6 and not results.errors
    final_steps = {r.config["optim.lr"]: [] for r in results}
    for r in results:
        final_steps[r.config["optim.lr"]].append(r.metrics["step"])
    assert set(final_steps) == {3e-3, 1e-8}  # both arms explored
    assert any(step < 60 for step in final_steps[1e-8])  # ASHA stopped the bad arm early
    assert max(final_steps[3e-3]) == 60


def nan_on_tiny_lr(searched, base):
    """Wraps the product trainable; the trial with lr 1e-5 gets a loss that turns NaN."""
    import torch

    from diffusion_lib.losses import DiffusionLoss
    from sweeps.trainable import train_trial

    if searched["optim.lr"] == 1e-5:
        original = DiffusionLoss.per_sample
        DiffusionLoss.per_sample = lambda self, *a: original(self, *a) * torch.tensor(float("nan"))
    train_trial(searched, base)


def test_a_nan_trial_errors_with_its_reason_while_siblings_finish(tmp_path, local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    spec = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 1e-5, 1e-3]}}))
    results = run_sweep(spec, trainable=nan_on_tiny_lr)
    errored = [r for r in results if r.error]
    assert len(errored) == 1 and "non-finite training loss" in str(errored[0].error)
    assert errored[0].config["optim.lr"] == 1e-5
    assert sorted(r.metrics["step"] for r in results if not r.error) == [20, 20]
    summary = json.loads((Path(results.experiment_path) / "experiment_summary.json").read_text())
    assert sum(t["status"] == "ERROR" for t in summary["trials"].values()) == 1


def crash_once_after_first_milestone(searched, base, marker):
    """The product trainable, made to crash once, right after its first checkpoint."""
    import diffusion_lib.trainer
    from sweeps.trainable import train_trial

    if not Path(marker).exists():
        original = diffusion_lib.trainer.Trainer._save_checkpoint

        def save_then_crash(self):
            path = original(self)
            if self.step == 20:
                Path(marker).write_text((self.run_dir / "metrics.jsonl").read_text())
                raise RuntimeError("simulated node failure")
            return path

        diffusion_lib.trainer.Trainer._save_checkpoint = save_then_crash
    train_trial(searched, base)


def test_max_failures_retries_a_crashed_trial_from_its_last_checkpoint(tmp_path, local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    spec = load_spec(write_spec(tmp_path, base={**TINY_RUN, "train": {"total_steps": 40, "batch_size": 8}},
                                search={"optim.lr": {"grid": [1e-4]}}, max_failures=1))
    marker = tmp_path / "crashed"
    results = run_sweep(spec, trainable=lambda searched, base: crash_once_after_first_milestone(searched, base, str(marker)))
    assert marker.exists() and not results.errors
    rows = [json.loads(line) for line in (Path(results[0].path) / "metrics.jsonl").read_text().splitlines()]
    before_crash = [json.loads(line) for line in marker.read_text().splitlines()]
    assert [r["step"] for r in before_crash] == [10, 20]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    # Resumed from the step-10 checkpoint: that milestone (wall time included) was not recomputed.
    assert rows[0] == before_crash[0]


def test_a_gpu_spec_on_a_cpu_only_cluster_is_refused_before_any_trial(tmp_path, local_ray):
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}, resources={"cpu": 1, "gpu": 0.25}))])
    assert result.exit_code == 2 and "resources.gpu" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()
