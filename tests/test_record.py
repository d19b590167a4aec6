"""The experiment record has one owner: one trial-state classifier and one best-FID rule, read
the same by the report, the tables, the Optuna study, the plots, the decisions and `sweep
status`. Experiments are built with the record's own writers (no Ray, no training)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from analysis.decisions import configurations
from analysis.plots import best_points
from analysis.report import analyze_experiment
from analysis.status import experiment_status
from record import states
from record.experiment import load_experiment

from conftest import write_ray_state, write_summary, write_sweep_file, write_trial

TOTAL = 30
ERROR = (
    'Traceback (most recent call last):\n  File "trainer.py", line 1\n'
    "NonFiniteLossError: non-finite training loss at step 14\n"
)


def row(step: int, fid: float, n: int = 64) -> dict:
    return {
        "step": step,
        "train/loss": 0.5,
        "val/fid": fid,
        "val/fid_stderr": 1.0,
        "val/fid_num_samples": n,
        "val/fid_reference": "ref.npz",
        "wall_time_s": 6.0 * step,
    }


def curve(*fids: float) -> list[dict]:
    return [row(10 * (i + 1), fid) for i, fid in enumerate(fids)]


def report_states(analysis) -> dict[str, str]:
    """The state column of report.md's trials table."""
    table = (analysis / "report.md").read_text().split("## Trials, best first\n\n")[1].split("\n\n")[0].splitlines()[2:]
    return {cells[0]: cells[1] for cells in (line.strip("| ").split(" | ") for line in table)}


def every_reader(path) -> dict[str, dict[str, str]]:
    """Each trial's state as each reader says it (Optuna's state mapped back through the user attribute)."""
    analyze_experiment(path)
    analysis = path / "analysis"
    table = pq.read_table(analysis / "trials.parquet").to_pylist()
    study = optuna.load_study(study_name=path.name, storage=f"sqlite:///{analysis / 'study.db'}")
    return {
        "report": report_states(analysis),
        "trials.parquet": {r["trial_id"]: r["state"] for r in table},
        "study": {t.user_attrs["trial_id"]: t.user_attrs["state"] for t in study.trials},
        "status": {t.trial_id: t.state for t in experiment_status(path).trials},
    }


def test_every_reader_says_the_same_state_for_every_state(tmp_path):
    """A sweep still running: Ray's state is fresh and there is no summary yet."""
    exp = tmp_path / "running_sweep"
    write_sweep_file(exp, {"optim.lr": {"grid": [1, 2, 3, 4, 5, 6]}})
    write_trial(exp, "a_finished", curve(300, 250, 240), searched={"optim.lr": 1})
    write_trial(exp, "b_stopped", curve(320), searched={"optim.lr": 2})
    write_trial(exp, "c_errored", curve(330), searched={"optim.lr": 3}, error=ERROR)
    write_trial(
        exp, "d_retried", curve(310, 260, 245), searched={"optim.lr": 4}, error=ERROR
    )  # errored, then finished on retry
    write_trial(exp, "e_running", curve(305), searched={"optim.lr": 5})
    write_ray_state(
        exp,
        {
            "a_finished": "TERMINATED",
            "b_stopped": "TERMINATED",
            "c_errored": "ERROR",
            "d_retried": "TERMINATED",
            "e_running": "RUNNING",
            "f_pending": "PENDING",
        },
    )
    expected = {
        "a_finished": states.FINISHED,
        "b_stopped": states.STOPPED,
        "c_errored": states.ERRORED,
        "d_retried": states.FINISHED,
        "e_running": states.RUNNING,
        "f_pending": states.PENDING,
    }
    readers = every_reader(exp)
    for reader, said in readers.items():
        assert said == expected, reader
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'analysis' / 'study.db'}")
    optuna_states = {t.user_attrs["trial_id"]: t.state for t in study.trials}
    assert optuna_states == {
        "a_finished": optuna.trial.TrialState.COMPLETE,
        "b_stopped": optuna.trial.TrialState.PRUNED,
        "c_errored": optuna.trial.TrialState.FAIL,
        "d_retried": optuna.trial.TrialState.COMPLETE,
        "e_running": optuna.trial.TrialState.RUNNING,
        "f_pending": optuna.trial.TrialState.WAITING,
    }


def test_after_the_sweep_ended_or_was_killed_every_reader_still_agrees(tmp_path):
    exp = tmp_path / "ended"
    write_sweep_file(exp, {"optim.lr": {"grid": [1, 2, 3]}})
    write_trial(exp, "a", curve(300, 250, 240), searched={"optim.lr": 1})
    write_trial(exp, "b", curve(320), searched={"optim.lr": 2})
    write_trial(exp, "c", curve(330), searched={"optim.lr": 3}, error=ERROR)
    write_ray_state(exp, {"a": "TERMINATED", "b": "TERMINATED", "c": "ERROR"}, age_s=60)
    write_summary(exp, {"a": states.FINISHED, "b": states.STOPPED, "c": states.ERRORED})
    assert all(said == {"a": "finished", "b": "stopped", "c": "errored"} for said in every_reader(exp).values())

    killed = tmp_path / "killed"  # no summary, nothing from Ray for an hour
    write_sweep_file(killed, {"optim.lr": {"grid": [1, 2]}})
    write_trial(killed, "a", curve(300, 250, 240), searched={"optim.lr": 1})
    write_trial(killed, "b", curve(320), searched={"optim.lr": 2})
    write_ray_state(killed, {"a": "TERMINATED", "b": "RUNNING"}, age_s=3600)
    assert all(said == {"a": "finished", "b": "interrupted"} for said in every_reader(killed).values())


def test_the_classifier_needs_no_ray_state_and_judges_aliveness_by_file_times(tmp_path):
    exp = tmp_path / "no_ray_yet"
    write_trial(exp, "a", curve(300), searched={"optim.lr": 1})
    write_trial(exp, "b", curve(300), searched={"optim.lr": 2}, error=ERROR)
    assert {t.trial_id: t.state for t in load_experiment(exp).trials} == {"a": "running", "b": "errored"}
    later = time.time() + 3600
    assert {t.trial_id: t.state for t in load_experiment(exp, now=later).trials} == {"a": "interrupted", "b": "errored"}


def test_one_best_fid_rule_for_tables_plots_report_status_and_decisions(tmp_path):
    """Trial a's lowest FID (40) is from 16 samples, another basis than the 64 most trials share:
    every reader must pick its step-20 milestone (52), and rank trial c (16 samples only) nowhere."""
    exp = tmp_path / "two_bases"
    write_sweep_file(exp, {"optim.lr": {"grid": [1e-3, 2e-3, 3e-3]}})
    write_trial(exp, "a", [row(10, 40.0, n=16), row(20, 52.0), row(30, 55.0)], searched={"optim.lr": 1e-3})
    write_trial(exp, "b", [row(10, 60.0), row(20, 53.0), row(30, 54.0)], searched={"optim.lr": 2e-3})
    write_trial(exp, "c", [row(10, 10.0, n=16)], searched={"optim.lr": 3e-3})
    write_summary(exp, {"a": "finished", "b": "finished", "c": "stopped"})
    analyze_experiment(exp)
    analysis = exp / "analysis"
    expected = {"a": (52.0, 20), "b": (53.0, 20)}

    tables = {
        r["trial_id"]: (r["best.val/fid"], r["best.val/fid_step"])
        for r in pq.read_table(analysis / "trials.parquet").to_pylist()
    }
    assert tables == {**expected, "c": (None, None)}
    experiment = load_experiment(exp)
    plotted = {t.trial_id: (best["val/fid"], best["step"]) for t, best in best_points(experiment, "optim.lr")}
    assert plotted == expected
    decided = {c.trials[0].trial_id: c.best_fids for c in configurations(experiment)}
    assert decided == {"a": [52.0], "b": [53.0], "c": []}
    info = experiment_status(exp)
    shown = {t.trial_id: (p.best, p.best_step) for t in info.trials if (p := info.fid_progress(t)) is not None}
    assert shown == expected
    assert info.lines[-1].startswith("best: a: val/fid 52.00 at step 20 (64 samples)")  # the sweep ended
    report = (analysis / "report.md").read_text()
    ranked = report.split("## Trials, best first\n\n")[1].split("\n\n")[0].splitlines()[2:]
    assert [line.split(" | ")[0].strip("| ") for line in ranked] == ["a", "b", "c"]
    assert "| 52 ± 1 | 20 |" in ranked[0] and "| 53 ± 1 | 20 |" in ranked[1] and "| – | – |" in ranked[2]
    assert "are not ranked with the others: a, c" in report


@pytest.mark.parametrize("module", ["sweeps", "analysis"])
def test_imports_run_one_way(module):
    """diffusion_lib ← record ← sweeps, analysis: sweeps never imports analysis, analysis never sweeps."""
    from conftest import REPO

    other = {"sweeps": "analysis", "analysis": "sweeps"}[module]
    for source in (REPO / module).glob("*.py"):
        lines = [line.strip() for line in source.read_text().splitlines()]
        assert not [line for line in lines if line.startswith((f"from {other}", f"import {other}"))], source


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_carry_the_umasks_permissions(tmp_path, umask, mode):
    """Files are written through a private temporary file; the renamed file must still be
    readable by whoever the umask lets read a new file (others, on shared storage)."""
    import subprocess
    import sys

    write = f"from record.files import SweepFile; SweepFile('val/fid', 'min', {{}}).write({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); {write}"], check=True)
    assert (tmp_path / "sweep.json").stat().st_mode & 0o777 == mode


def test_a_mirror_copies_every_experiment_file_status_and_analysis_read():
    """A URI experiment is read through a local mirror: the Ctrl-C record and the FID floor must
    travel with the summary, or `sweep status` and the report would not know them."""
    from diffusion_lib.run_files import FLOOR_FILE
    from record.files import INTERRUPTED_FILE, SUMMARY_FILE, SWEEP_FILE
    from record.mirror import SKIP, SMALL, experiment_file_kind

    for name in (SWEEP_FILE, SUMMARY_FILE, INTERRUPTED_FILE, FLOOR_FILE, "experiment_state-2026.json"):
        assert experiment_file_kind((name,)) == SMALL, name
    assert experiment_file_kind(("fid_reference", "ref.npz")) == SKIP


def test_a_mirror_fetches_only_the_checkpoints_and_sample_grids_it_is_asked_for(tmp_path):
    """`sweep status` mirrors neither checkpoints nor sample grids; the analysis fetches the ones
    its images come from, the other checkpoints only as empty placeholders (their steps)."""
    from diffusion_lib.run_files import SAMPLES_DIR, checkpoint_name, sample_grid_name
    from record.mirror import mirror_experiment

    stored = tmp_path / "stored"
    trial = write_trial(stored, "t0", [row(10, 300.0), row(20, 290.0)], searched={"optim.lr": 1e-3})
    (trial / SAMPLES_DIR).mkdir()
    for index, step in enumerate([10, 20]):
        (trial / f"checkpoint_00000{index}").mkdir()
        (trial / f"checkpoint_00000{index}" / checkpoint_name(step)).write_bytes(f"checkpoint {step}".encode())
        (trial / SAMPLES_DIR / sample_grid_name(step)).write_bytes(f"grid {step}".encode())

    def heavy_files(mirror: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(mirror / "t0")): p.read_bytes() for p in mirror.rglob("*") if p.suffix in (".pt", ".png")
        }

    assert heavy_files(mirror_experiment(f"file://{stored}", tmp_path / "for_status")) == {}
    wanted = [Path("checkpoint_000001") / checkpoint_name(20), Path(SAMPLES_DIR) / sample_grid_name(10)]
    mirror = mirror_experiment(
        f"file://{stored}", tmp_path / "for_analysis", fetch=lambda m: [m / "t0" / w for w in wanted]
    )
    assert heavy_files(mirror) == {
        f"checkpoint_000000/{checkpoint_name(10)}": b"",
        f"checkpoint_000001/{checkpoint_name(20)}": b"checkpoint 20",
        f"{SAMPLES_DIR}/{sample_grid_name(10)}": b"grid 10",
    }
