"""`sweep status`: experiment directories built by hand with the files a sweep writes (no Ray, no
training): mid-run, ended, killed, Ctrl-C'd, not an experiment; FIDs compared at one count; --watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analysis.status import CLEAR_SCREEN, experiment_status, watch
from cli.main import app
from record.files import SweepFile

from conftest import as_from_a_terminal, write_ray_state, write_summary, write_trial

runner = CliRunner()
TOTAL = 30
ERROR_TEXT = (
    'Traceback (most recent call last):\n  File "trainer.py", line 1\n'
    "NonFiniteLossError: non-finite training loss at step 14\n"
)


def row(step: int, fid: float | None = None, n: int = 64) -> dict:
    r = {"step": step, "train/loss": 0.5, "wall_time_s": 6.0 * step}
    if fid is not None:
        r.update({"val/fid": fid, "val/fid_num_samples": n})
    return r


@pytest.fixture
def mid_run(tmp_path) -> Path:
    """No summary: one trial finished, one with a torn last line, one errored, one not reporting yet."""
    exp = tmp_path / "exp"
    exp.mkdir()
    SweepFile("val/fid", "min", {"optim.lr": {"grid": [1e-4, 2e-4, 3e-4, 4e-4]}}).write(str(exp))
    exp.mkdir(exist_ok=True)
    write_trial(exp, "t0_lr=0.0001", [row(10, 300.0), row(20, 200.0), row(30, 150.0)], searched={"optim.lr": 1e-4})
    write_trial(exp, "t1_lr=0.0002", [row(10, 310.0)], torn='{"step": 20, "val/fid": 19', searched={"optim.lr": 2e-4})
    write_trial(exp, "t2_lr=0.0003", [row(10, 320.0)], error=ERROR_TEXT, searched={"optim.lr": 3e-4})
    write_trial(exp, "t3_lr=0.0004", metrics=False, searched={"optim.lr": 4e-4})
    return exp


def statuses(exp: Path, **kwargs) -> dict[str, str]:
    return {t.trial_id: t.state for t in experiment_status(exp, **kwargs).trials}


def line_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(name + " "))


def test_mid_run_statuses_from_files_while_files_are_being_written(mid_run):
    result = runner.invoke(app, ["status", str(mid_run)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "finished" in line_of(out, "t0_lr=0.0001") and "30/30" in line_of(out, "t0_lr=0.0001")
    assert "running" in line_of(out, "t1_lr=0.0002") and "10/30" in line_of(out, "t1_lr=0.0002")  # torn line skipped
    assert "errored" in line_of(out, "t2_lr=0.0003") and "NonFiniteLossError: non-finite training loss" in line_of(
        out, "t2_lr=0.0003"
    )
    assert "running" in line_of(out, "t3_lr=0.0004") and "no milestone yet" in line_of(out, "t3_lr=0.0004")
    assert "totals: 4 trials: 2 running, 0 pending, 1 finished, 0 stopped, 1 errored" in out
    assert "best so far: t0_lr=0.0001: val/fid 150.00 at step 30 (64 samples); optim.lr=0.0001" in out
    assert "0:03:00" in line_of(out, "t0_lr=0.0001")  # wall_time_s of the last row
    assert "truncated or corrupt line" in result.stderr


def test_a_killed_sweep_is_interrupted_not_running_forever(mid_run):
    later = time.time() + 3600  # an hour without a file changing, and no summary
    assert statuses(mid_run, now=later) == {
        "t0_lr=0.0001": "finished",
        "t1_lr=0.0002": "interrupted",
        "t2_lr=0.0003": "errored",
        "t3_lr=0.0004": "interrupted",
    }


def test_ray_state_lists_pending_trials_and_is_the_sweeps_heartbeat(mid_run):
    write_ray_state(
        mid_run,
        {"t1_lr=0.0002": "RUNNING", "t2_lr=0.0003": "PENDING", "t3_lr=0.0004": "RUNNING", "t4_lr=0.0005": "PENDING"},
    )
    report = experiment_status(mid_run)
    assert {t.trial_id: t.state for t in report.trials} == {
        "t0_lr=0.0001": "finished",
        "t1_lr=0.0002": "running",
        "t2_lr=0.0003": "pending",  # waiting for its retry
        "t3_lr=0.0004": "running",
        "t4_lr=0.0005": "pending",
    }
    assert "retrying after an error" in report.by_name()["t2_lr=0.0003"].note
    assert report.by_name()["t4_lr=0.0005"].searched == {"optim.lr": 5e-4}
    assert "sweep running" in report.header

    # The driver stopped writing (killed): its trials are interrupted though their files look recent.
    write_ray_state(
        mid_run, {"t1_lr=0.0002": "RUNNING", "t3_lr=0.0004": "RUNNING", "t4_lr=0.0005": "PENDING"}, age_s=900
    )
    report = experiment_status(mid_run)
    assert [report.by_name()[n].state for n in ("t1_lr=0.0002", "t3_lr=0.0004", "t4_lr=0.0005")] == [
        "interrupted",
        "interrupted",
        "pending",
    ]
    assert "sweep not running" in report.header and "--resume" in report.header


def test_unreadable_ray_state_falls_back_to_files_with_a_warning(mid_run):
    (mid_run / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [["{\\"stat')
    report = experiment_status(mid_run)
    assert report.by_name()["t1_lr=0.0002"].state == "running"
    assert any("Ray's experiment state unreadable" in w for w in report.warnings)


def test_after_the_summary_statuses_are_final(mid_run):
    write_summary(
        mid_run,
        {"t0_lr=0.0001": "finished", "t1_lr=0.0002": "stopped", "t2_lr=0.0003": "errored", "t3_lr=0.0004": "stopped"},
    )
    result = runner.invoke(app, ["status", str(mid_run)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "sweep ended" in out.splitlines()[0]
    assert "finished" in line_of(out, "t0_lr=0.0001")
    assert "stopped" in line_of(out, "t1_lr=0.0002")
    assert "errored" in line_of(out, "t2_lr=0.0003") and "NonFiniteLossError" in line_of(out, "t2_lr=0.0003")
    assert "totals: 4 trials: 0 running, 0 pending, 1 finished, 2 stopped, 1 errored" in out


def test_ctrl_c_then_summary_is_interrupted_and_a_resume_makes_the_summary_stale(mid_run):
    # Ray saves its state (trials still RUNNING) before it stops them; the summary then says TERMINATED.
    write_ray_state(
        mid_run, {"t1_lr=0.0002": "RUNNING", "t3_lr=0.0004": "RUNNING", "t5_lr=0.0006": "PENDING"}, age_s=60
    )
    write_summary(
        mid_run,
        {
            "t0_lr=0.0001": "finished",
            "t1_lr=0.0002": "stopped",
            "t2_lr=0.0003": "errored",
            "t3_lr=0.0004": "stopped",
            "t5_lr=0.0006": "stopped",
        },
    )
    assert statuses(mid_run) == {
        "t0_lr=0.0001": "finished",
        "t1_lr=0.0002": "interrupted",
        "t2_lr=0.0003": "errored",
        "t3_lr=0.0004": "interrupted",
        "t5_lr=0.0006": "pending",
    }
    # `sweep run --resume` rewrites sweep.json: until it ends, the old summary no longer holds.
    past = time.time() - 30
    os.utime(mid_run / "experiment_summary.json", (past, past))
    SweepFile("val/fid", "min", {}).write(str(mid_run))
    assert statuses(mid_run)["t1_lr=0.0002"] == "running"


def test_best_compares_only_fids_at_the_same_sample_count(tmp_path):
    exp = tmp_path / "exp"
    rows = [row(10, 40.0, n=16), row(20, 52.0), row(30, 55.0)]  # 40 is from 16 samples: not comparable
    write_trial(exp, "a_lr=0.001", rows, searched={"optim.lr": 1e-3, "model.base_channels": 64})
    write_trial(
        exp, "b_lr=0.002", [row(10, 60.0), row(20, 53.0)], searched={"optim.lr": 2e-3, "model.base_channels": 64}
    )
    write_trial(exp, "c_lr=0.003", [row(10, 10.0, n=16)], searched={"optim.lr": 3e-3, "model.base_channels": 32})
    info = experiment_status(exp)
    progress = info.fid_progress(info.by_name()["a_lr=0.001"])
    assert (progress.latest, progress.num_samples, progress.best, progress.best_step) == (55.0, 64, 52.0, 20)
    result = runner.invoke(app, ["status", str(exp)])
    assert result.exit_code == 0, result.output
    assert "52.00 (20)" in line_of(result.stdout, "a_lr=0.001") and "55.00" in line_of(result.stdout, "a_lr=0.001")
    best = next(line for line in result.stdout.splitlines() if line.startswith("best so far"))
    assert best.startswith(
        "best so far: a_lr=0.001: val/fid 52.00 at step 20 (64 samples); optim.lr=0.001, model.base_channels=64"
    )
    assert "1 trial(s) with FIDs at other sample counts not compared" in best


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None, lambda p: (p.mkdir(), (p / "notes").mkdir())])
def test_not_an_experiment_exits_2_with_one_line(tmp_path, make):
    path = tmp_path / "nothing"
    make(path)
    result = runner.invoke(app, ["status", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "experiment directory" in result.stderr


def test_watch_refreshes_until_ctrl_c_and_shows_new_milestones(mid_run, monkeypatch):
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt
        with open(mid_run / "t3_lr=0.0004" / "metrics.jsonl", "a") as f:  # a trial reports its first milestone
            f.write(json.dumps(row(10, 330.0)) + "\n")

    monkeypatch.setattr(time, "sleep", fake_sleep)
    result = runner.invoke(app, ["status", str(mid_run), "--watch", "--interval", "2.5"])
    assert result.exit_code == 0, result.output
    assert sleeps == [2.5, 2.5]
    assert result.stdout.count("totals: 4 trials") == 2 and CLEAR_SCREEN not in result.stdout  # not a terminal
    first, second = result.stdout.split("\n\n")
    assert "-/30" in line_of(first, "t3_lr=0.0004") and "10/30" in line_of(second, "t3_lr=0.0004")


def test_watch_clears_the_screen_on_a_terminal_and_fails_at_once_on_a_non_experiment(mid_run, tmp_path):
    shown, warned = [], []
    calls = iter([None, KeyboardInterrupt])

    def sleep(_):
        if next(calls):
            raise KeyboardInterrupt

    watch(mid_run, 1, shown.append, warned.append, clear=True, sleep=sleep)
    assert len(shown) == 2 and all(s.startswith(CLEAR_SCREEN) for s in shown)
    assert len(warned) == 2 and all("truncated or corrupt line" in w for w in warned)
    result = runner.invoke(app, ["status", str(tmp_path / "missing"), "--watch"])
    assert result.exit_code == 2


def test_watch_in_a_real_process_stops_cleanly_on_ctrl_c(mid_run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "status", str(mid_run), "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        lines = []
        while not any(line.startswith("totals:") for line in lines):
            line = proc.stdout.readline()
            assert line, f"exited early with {proc.wait()}: {lines}"
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)  # drained: a full pipe must not hold the watcher at its exit
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(line.startswith("t1_lr=0.0002 ") and "running" in line for line in lines)


def test_status_imports_neither_torch_nor_tensorboard_nor_ray(mid_run):
    """`sweep status` reads files through `record` alone, so it starts in about a second."""
    probe = (
        "import sys; from typer.testing import CliRunner; from cli.main import app; "
        f"result = CliRunner().invoke(app, ['status', {str(mid_run)!r}]); "
        "print(result.exit_code, *(name in sys.modules for name in ('torch', 'tensorboard', 'ray')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False", "False", "False"], done.stdout + done.stderr


def test_status_says_how_far_rankings_still_move_once_three_trials_went_past_a_milestone(tmp_path):
    """Mid-run: three trials past step 10 whose FIDs there did not hold their order by step 20
    (no standard errors: all of the change is training dynamics), a fourth still at step 10."""
    exp = tmp_path / "exp"
    curves = {"a": (300.0, 250.0), "b": (320.0, 220.0), "c": (340.0, 280.0)}
    for name, (at_10, at_20) in curves.items():
        write_trial(exp, f"{name}_lr=1", [row(10, at_10), row(20, at_20)], searched={"optim.lr": 1})
    write_trial(exp, "d_lr=1", [row(10, 330.0)], searched={"optim.lr": 1})
    result = runner.invoke(app, ["status", str(exp)])
    assert result.exit_code == 0, result.output
    # The trailers' catch-ups from step 10 to 20: 50, 10, −40 (counts 0): τ = √(2 · (2500 + 100) / 3) = 41.6.
    assert result.stdout.splitlines()[-1] == (
        "rankings still move (FID, training dynamics beyond sampling): after step 10: 41.6 (3 trials past it)"
    )
    write_trial(exp, "b_lr=1", [row(10, 320.0)], searched={"optim.lr": 1})  # only two past step 10: not yet said
    assert "rankings still move" not in runner.invoke(app, ["status", str(exp)]).stdout


def test_a_resumed_sweeps_state_is_read_from_its_own_session_not_the_one_copied_back_after_it(mid_run):
    """A resumed run writes its experiment_state file, then copies the earlier session's back
    within microseconds: the newer modification time can be the stale file's."""
    stale = write_ray_state(mid_run, {"t1_lr=0.0002": "PENDING", "t3_lr=0.0004": "PENDING"})
    current = stale.with_name("experiment_state-2026-01-02_00-00-00.json")  # the resumed session's, by its start
    stale.rename(current)
    write_ray_state(mid_run, {"t1_lr=0.0002": "PENDING", "t3_lr=0.0004": "PENDING"})
    current.write_text(current.read_text().replace('\\"PENDING\\"', '\\"RUNNING\\"'))
    os.utime(current, (time.time() - 1, time.time() - 1))  # older on disk than the stale copy
    report = experiment_status(mid_run)
    assert [report.by_name()[n].state for n in ("t1_lr=0.0002", "t3_lr=0.0004")] == ["running", "running"]
