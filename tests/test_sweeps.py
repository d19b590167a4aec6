"""Real Ray Tune sweeps on the CPU, in this process, on one Ray for the module: grid, racing,
Optuna + ASHA, a NaN and a crashing trial, relative paths, a failed sweep and its resume, a GPU
spec on a CPU-only cluster."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from typer.testing import CliRunner

from analysis.curves import floor_gap
from cli.main import app
from cli.sweep_end import report_results
from diffusion_lib.losses import DiffusionLoss
from diffusion_lib.run_files import FLOOR_FILE
from diffusion_lib.trainer import Trainer
from record.experiment import load_experiment
from record.files import REFERENCE_DIR, StoppedEarly
from sweeps.console import sweep_reporter
from sweeps.runner import run_sweep
from sweeps.spec import load_spec

import conftest
from conftest import (
    TINY_RUN,
    run_sweep_with_standin_fid,
    sessions_by_status,
    start_test_ray,
    trainer_with_parts,
    write_spec,
)

pytestmark = pytest.mark.slow  # every test here starts Ray

runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: a second ray.init in a process that ran Tune can hang here."""
    start_test_ray()
    yield
    ray.shutdown()


def test_grid_sweep_reports_every_milestone_key_against_one_stored_reference(tmp_path, local_ray):
    base = {
        **TINY_RUN,
        "fid": {
            "num_samples": 8,
            "final_num_samples": 0,
            "ref_num_images": 32,
            "cache_dir": str(tmp_path / "fid_cache"),
        },
    }
    spec = load_spec(
        write_spec(
            tmp_path,
            base=base,
            metric="val/fid",
            search={
                "optim.lr": {"grid": [1e-4, 1e-3]},
                "loss": {"grid": [{"weighting": "constant"}, {"weighting": "min_snr", "minsnr_gamma": 5}]},
            },
        )
    )
    results = run_sweep_with_standin_fid(spec)  # asserts the one reference pass, in the launcher
    assert len(results) == 4 and not results.errors
    assert not (tmp_path / "cache").exists()  # no trial computed a reference of its own
    frame = results.get_dataframe()
    assert {"step", "train/loss", "wall_time_s", "images_seen", "loss/t_bucket_0", "val/fid_jackknife"} <= set(
        frame.columns
    )
    assert sorted(frame["config/optim.lr"]) == [1e-4, 1e-4, 1e-3, 1e-3]
    assert all(r.metrics["step"] == 20 for r in results)
    # One TensorBoard run (and trainer log) per trial, named by its searched values; every FID row
    # names the one reference stored with the experiment.
    experiment = load_experiment(Path(results.experiment_path))
    assert len(experiment.trials) == 4 and any(
        "minsnr_gamma=5" in t.trial_id and "weighting=min_snr" in t.trial_id for t in experiment.trials
    )
    assert {t.state for t in experiment.trials} == {"finished"}
    for trial in experiment.trials:
        assert list(trial.path.glob("events.out.tfevents.*")) and trial.config["train.total_steps"] == 20
        (name,) = {row["val/fid_reference"] for row in trial.milestones}
        assert (experiment.path / REFERENCE_DIR / name).is_file()
        assert {row["val/fid_num_samples"] for row in trial.milestones} == {8} and len(
            trial.milestones[-1]["val/fid_jackknife"]
        ) == 6
        assert not (trial.path / FLOOR_FILE).exists()
    # The FID floor: computed once, in the launcher, stored with the experiment, stated by the analysis.
    floor = experiment.floor_point()
    assert floor is not None and floor.num_samples == 8 and floor.fid > 0 and floor.stderr > 0
    assert experiment.floor.held_out_images == 32
    assert floor_gap(experiment).sentence.startswith("Real images (training images outside the reference) score")


def test_racing_stops_the_clearly_worse_arm_and_the_record_says_stopped(tmp_path, local_ray):
    base = {
        **TINY_RUN,
        "train": {"total_steps": 60, "batch_size": 8},
        "fid": {"num_samples": 64, "final_num_samples": 0},
    }
    spec = load_spec(
        write_spec(
            tmp_path,
            base=base,
            metric="val/fid",
            max_concurrent=1,
            search={"optim.lr": {"grid": [3e-3, 1e-8]}},  # 1e-8 cannot learn in 60 steps
            scheduler={"type": "racing", "grace_period": 30, "reduction_factor": 2, "z": 2.5},
        )
    )
    results = run_sweep_with_standin_fid(spec)
    steps = {r.config["optim.lr"]: r.metrics["step"] for r in results}
    assert steps == {3e-3: 60, 1e-8: 30}  # the first arm to the rung goes on; the clearly worse one is cut there
    summary = json.loads((Path(results.experiment_path) / "experiment_summary.json").read_text())["trials"]
    assert sorted(t["state"] for t in summary.values()) == ["finished", "stopped"]


def test_racing_dynamics_runs_pilots_then_cuts_beyond_sampling_and_dynamics_and_says_why(tmp_path, local_ray, capfd):
    """Four shapes trials one at a time: the first three run to the end as the rung's pilots (its
    training-dynamics term unmeasured, nothing is cut); the fourth, which cannot learn, is cut at
    its first rung, with one console line and its record saying why."""
    base = {
        **TINY_RUN,
        "train": {"total_steps": 40, "batch_size": 8},
        "fid": {"num_samples": 64, "final_num_samples": 0},
    }
    spec = load_spec(
        write_spec(
            tmp_path,
            base=base,
            metric="val/fid",
            max_concurrent=1,
            search={"optim.lr": {"grid": [3e-3, 2e-3, 1e-3, 1e-8]}},  # 1e-8 cannot learn in 40 steps
            # z 1.5: the stand-in FID separates the arms by a few standard errors, not tens
            scheduler={"type": "racing_dynamics", "grace_period": 20, "reduction_factor": 2, "z": 1.5},
        )
    )
    results = run_sweep_with_standin_fid(spec)
    steps = {r.config["optim.lr"]: r.metrics["step"] for r in results}
    assert steps == {3e-3: 40, 2e-3: 40, 1e-3: 40, 1e-8: 20}
    (stopped,) = [Path(r.path) for r in results if r.config["optim.lr"] == 1e-8]
    reason = StoppedEarly.read(stopped, [])
    assert reason.step == 20 and "training dynamics" in reason.reason and "from 3 pairs of 3 trials" in reason.reason
    console = capfd.readouterr().err
    assert console.count(" stopped at step 20: val/fid ") == 1 and reason.reason in console
    summary = json.loads((Path(results.experiment_path) / "experiment_summary.json").read_text())["trials"]
    assert sorted(t["state"] for t in summary.values()) == ["finished", "finished", "finished", "stopped"]


def test_optuna_with_asha_stops_the_clearly_worse_arm_early(tmp_path, local_ray):
    spec = load_spec(
        write_spec(
            tmp_path,
            base={**TINY_RUN, "train": {"total_steps": 40, "batch_size": 8}},
            search={"optim.lr": {"choice": [3e-3, 1e-8]}},  # 1e-8 cannot learn in 40 steps
            algorithm="optuna",
            seed=6,
            num_samples=6,
            max_concurrent=1,
            scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2},
        )
    )
    results = run_sweep(spec)
    assert len(results) == 6 and not results.errors
    final_steps = {r.config["optim.lr"]: [] for r in results}
    for r in results:
        final_steps[r.config["optim.lr"]].append(r.metrics["step"])
    assert set(final_steps) == {3e-3, 1e-8}  # both arms explored
    assert any(step < 40 for step in final_steps[1e-8])  # ASHA stopped the bad arm early
    assert max(final_steps[3e-3]) == 40
    # TensorBoard's HParams view knows every trial, the ones ASHA stopped too, by its own reader,
    # and its Status filter counts every one of them a success: none failed, none runs.
    for result in results:
        (session,) = hparams_sessions(Path(result.path))
        assert session.hparams["optim.lr"].number_value == result.config["optim.lr"]
    by_status = sessions_by_status(Path(results.experiment_path))
    assert by_status == {"Success": {Path(r.path).name for r in results}, "Failure": set(), "Unknown": set()}


def hparams_sessions(run_dir: Path) -> list:
    """Every HParams session-start record in a run's TensorBoard events, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    sessions.append(data.session_start_info)
    return sessions


def test_the_progress_table_says_finished_or_stopped_where_ray_says_terminated(tmp_path, local_ray, capsys):
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    trials = []
    for i, (status, step) in enumerate([("TERMINATED", 40), ("TERMINATED", 10), ("RUNNING", 20), ("ERROR", 10)]):
        storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="tiny", trial_dir_name=f"t{i}")
        trial = Trial("train_trial", config={"optim.lr": 10.0**-i}, trial_id=f"t{i}", stub=True, storage=storage)
        trial.set_status(status)
        trial.update_last_result({"step": step, "config": trial.config})  # as a real result holds it
        trials.append(trial)
    reporter = sweep_reporter(["step"], ["optim.lr"], total_steps=lambda searched: 40)
    reporter.setup(start_time=time.time(), total_samples=4, metric="step", mode="max")
    reporter.report(trials, False)
    printed = capsys.readouterr().out.splitlines()
    assert "Number of trials: 4/4 (1 ERROR, 1 RUNNING, 1 finished, 1 stopped)" in printed
    table = [line for line in printed if line.startswith(("|", "+"))]
    statuses = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in table) if len(cells) > 3}
    assert statuses == {
        "Trial name": "status",
        "train_trial_t0": "finished",  # at its last step
        "train_trial_t1": "stopped",  # before it: by the scheduler
        "train_trial_t2": "RUNNING",
        "train_trial_t3": "ERROR",
    }
    assert len({len(line) for line in table}) == 1  # the columns still line up


def pickle_tests_by_value() -> None:
    """Ray workers cannot import the test modules: ship their functions by value."""
    for module in (sys.modules[__name__], conftest):
        ray.cloudpickle.register_pickle_by_value(module)


class NaNLoss(DiffusionLoss):
    def per_sample(self, *args):
        return super().per_sample(*args) * torch.tensor(float("nan"))


def nan_on_tiny_lr(config, run_dir, **kwargs):
    """The trial with lr 1e-5 is handed a loss that is NaN."""
    return trainer_with_parts(config, run_dir, loss_class=NaNLoss if config.optim.lr == 1e-5 else None, **kwargs)


def test_a_nan_trial_errors_with_its_reason_while_siblings_finish(tmp_path, local_ray):
    pickle_tests_by_value()
    spec = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 1e-5, 1e-3]}}))
    results = run_sweep(spec, make_trainer=nan_on_tiny_lr)
    errored = [r for r in results if r.error]
    assert len(errored) == 1 and "non-finite training loss" in str(errored[0].error)
    assert errored[0].config["optim.lr"] == 1e-5
    assert sorted(r.metrics["step"] for r in results if not r.error) == [20, 20]
    summary = json.loads((Path(results.experiment_path) / "experiment_summary.json").read_text())
    assert sum(t["state"] == "errored" for t in summary["trials"].values()) == 1
    by_status = sessions_by_status(Path(results.experiment_path))
    assert by_status["Failure"] == {Path(errored[0].path).name}
    assert by_status["Success"] == {Path(r.path).name for r in results if not r.error} and not by_status["Unknown"]


class CrashOnceAtStep20(Trainer):
    """Crashes once, right after writing its step-20 checkpoint (the marker file says it did)."""

    marker: Path

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == 20 and not self.marker.exists():
            self.marker.write_text((self.run_dir / "metrics.jsonl").read_text())
            raise RuntimeError("simulated node failure")
        return path


def test_max_failures_retries_a_crashed_trial_from_its_last_checkpoint(tmp_path, local_ray):
    pickle_tests_by_value()
    spec = load_spec(
        write_spec(
            tmp_path,
            base={**TINY_RUN, "train": {"total_steps": 40, "batch_size": 8}},
            search={"optim.lr": {"grid": [1e-4]}},
            max_failures=1,
        )
    )
    marker = tmp_path / "crashed"
    CrashOnceAtStep20.marker = marker
    results = run_sweep(
        spec,
        make_trainer=lambda config, run_dir, **kw: trainer_with_parts(
            config, run_dir, trainer_class=CrashOnceAtStep20, **kw
        ),
    )
    assert marker.exists() and not results.errors
    rows = [json.loads(line) for line in (Path(results[0].path) / "metrics.jsonl").read_text().splitlines()]
    before_crash = [json.loads(line) for line in marker.read_text().splitlines()]
    assert [r["step"] for r in before_crash] == [10, 20]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    # Resumed from the step-10 checkpoint: that milestone (wall time included) was not recomputed.
    assert rows[0] == before_crash[0]
    assert len(hparams_sessions(Path(results[0].path))) == 1  # the resumed trial is one HParams session


def test_relative_paths_mean_what_the_user_typed(tmp_path, local_ray, monkeypatch):
    """A relative data.root resolves against the launch directory, not a Ray worker's."""
    from PIL import Image

    launch = tmp_path / "launch"
    (launch / "images").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 100, 200)).save(launch / "images" / f"{i}.png")
    spec = write_spec(
        launch,
        base={**TINY_RUN, "data": {"name": "folder", "root": "images"}},
        storage="runs",
        search={"optim.lr": {"grid": [1e-4]}},
    )
    monkeypatch.chdir(launch)
    done = runner.invoke(app, ["run", spec.name, "--no-analyze"])
    assert done.exit_code == 0, done.output[-3000:]
    (trial,) = (launch / "runs" / "tiny").glob("*/trial.json")
    assert json.loads(trial.read_text())["config"]["data.root"] == str(launch / "images")


def fail_until_fixed(config, run_dir, **kwargs):
    """Every trial fails (with a colour-coded message, as Ray's tracebacks are) until the marker exists."""
    if not FIXED.exists():
        raise RuntimeError("\x1b[31mdisk on fire\x1b[0m at trial start")
    return trainer_with_parts(config, run_dir, **kwargs)


FIXED = Path("/nonexistent")
ANSI = re.compile(r"\x1b\[")


def test_a_failed_sweep_fails_and_resume_tells_the_truth(tmp_path, local_ray, capsys):
    global FIXED
    FIXED = tmp_path / "fixed"
    pickle_tests_by_value()
    spec = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 1e-3]}}))

    results = run_sweep(spec, make_trainer=fail_until_fixed)
    assert report_results(spec, results, analyze=True) == 1
    out = capsys.readouterr()
    assert re.search(r"2 of 2 trials errored; full tracebacks in \S+/error.txt, \S+/error.txt", out.err)
    experiment = Path(spec.experiment_path)
    report = (experiment / "analysis" / "report.md").read_text()
    error_lines = [line for line in report.splitlines() if line.startswith("- `") and "disk on fire" in line]
    assert len(error_lines) == 1 and not ANSI.search(report)  # one error, said once, naming both trials
    assert error_lines[0].count("_lr=") == 2 and error_lines[0].endswith("RuntimeError: disk on fire at trial start")
    assert pq.read_table(experiment / "analysis" / "trials.parquet").column("state").to_pylist() == [
        "errored",
        "errored",
    ]
    assert (
        f"report: {experiment / 'analysis' / 'report.md'}" in out.out
        and f"tensorboard --logdir {experiment}" in out.out
    )

    FIXED.write_text("")
    resumed = run_sweep(spec, resume=True, make_trainer=fail_until_fixed)
    assert report_results(spec, resumed, analyze=True) == 0
    assert pq.read_table(experiment / "analysis" / "trials.parquet").column("state").to_pylist() == [
        "finished",
        "finished",
    ]
    assert "disk on fire" not in (experiment / "analysis" / "report.md").read_text()

    relaxed = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}, fail_on_trial_error=False))
    assert report_results(relaxed, results, analyze=False) == 0  # errors expected: the spec opted out


def test_a_gpu_spec_on_a_cpu_only_cluster_is_refused_before_any_trial(tmp_path, local_ray):
    result = runner.invoke(
        app,
        ["run", str(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}, resources={"cpu": 1, "gpu": 0.25}))],
    )
    assert result.exit_code == 2 and "resources.gpu" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()
