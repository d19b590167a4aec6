"""Sweeps as a user runs them, in their own processes: kill -9 of the driver then --resume,
and `sweep run --address` on a two-node Ray cluster whose worker node dies mid-trial."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import FID_WEIGHTS, REPO, TINY_RUN, as_from_a_terminal, needs_fid_weights, tiny_run, write_spec


def clean_env() -> dict[str, str]:
    """This machine's environment without any Ray cluster address another test left behind."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_kill_minus_9_then_resume_finishes_without_recomputing(tmp_path):
    """The racing scheduler's rungs survive the kill too: z = 100 stops nothing, so every trial
    runs to its end, and its rung at step 20 ends up holding all three trials only if the
    records made before the kill were restored (the interrupted trial resumes past step 20)."""
    spec = write_spec(
        tmp_path,
        base=tiny_run(train={"total_steps": 120}, eval={"every": 20}, curvature={"probes": 2}),
        search={"optim.lr": {"grid": [1e-4, 2e-4, 3e-4]}},
        metric="curvature/hutch_trace_mean",
        scheduler={"type": "racing", "grace_period": 20, "reduction_factor": 2, "z": 100},
        max_concurrent=1,
    )
    experiment = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "cli", "run", str(spec), "--no-analyze"]
    env = {**clean_env(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Ray saves its experiment state every second
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def metrics_by_trial() -> dict[str, list[dict]]:
        found = {}
        for path in experiment.glob("*/metrics.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            found[path.parent.name] = rows
        return found

    def recorded_by_ray(trial: str) -> bool:
        """Whether Ray's saved experiment state (what --resume restores) holds a checkpoint of
        the trial: Ray saves it every TUNE_GLOBAL_CHECKPOINT_S, so a newer checkpoint on disk is,
        rightly, not resumed from."""
        for state in experiment.glob("experiment_state-*.json"):
            try:
                trials = json.loads(state.read_text())["trial_data"]
            except (ValueError, KeyError, OSError):  # caught mid-write
                continue
            for trial_json, runtime_json in trials:
                if json.loads(trial_json).get("relative_logdir") == trial and "checkpoint_0" in runtime_json:
                    return True
        return False

    # Wait for one finished trial and one with a checkpoint Ray has recorded, then kill everything.
    deadline = time.time() + 240
    while time.time() < deadline:
        found = metrics_by_trial()
        done = [t for t, rows in found.items() if rows and rows[-1]["step"] == 120]
        started = [
            t
            for t, rows in found.items()
            if rows and rows[-1]["step"] < 120 and list((experiment / t).glob("checkpoint_*"))
        ]
        if done and started and recorded_by_ray(started[0]):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the sweep did not reach the kill point in time")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = metrics_by_trial()
    finished_before = (experiment / done[0] / "metrics.jsonl").read_text()

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = metrics_by_trial()
    assert len(after) == 3
    assert all(
        rows[-1]["step"] == 120 and [r["step"] for r in rows] == list(range(20, 121, 20)) for rows in after.values()
    )
    assert (experiment / done[0] / "metrics.jsonl").read_text() == finished_before  # not recomputed
    interrupted = started[0]
    assert after[interrupted][0] == before[interrupted][0]  # resumed from a checkpoint, not step 0 (wall time included)
    assert "Rung step 20 (3 trials)" in resumed.stdout  # not (1 trial): the records before the kill were restored
    # Without --resume, the existing experiment is refused rather than overwritten.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_node_dies_and_its_trial_resumes_on_the_other_from_its_checkpoint(tmp_path):
    """`sweep run --address` against a two-node Ray cluster (ray.cluster_utils on one machine),
    each in its own process as a user would run them; the worker node's raylet is killed
    (kill -9) while a trial runs there with checkpoints stored."""
    total, every = 200, 20
    spec = write_spec(
        tmp_path,
        base=tiny_run(train={"total_steps": total}, eval={"every": every}),
        search={"optim.lr": {"grid": [1e-4, 2e-4]}},
        max_failures=1,
    )
    experiment = tmp_path / "runs" / "tiny"
    script = REPO / "tests" / "two_node_cluster.py"
    done = subprocess.run(
        [sys.executable, str(script), str(spec), str(experiment)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^Ray at \S+: 2 nodes, 2 CPUs, 0 GPUs$", done.stderr, re.MULTILINE), done.stderr[-3000:]
    killed = json.loads((tmp_path / "killed.json").read_text())
    trials = {p.parent.name: json.loads(p.read_text()) for p in experiment.glob("*/trial.json")}
    assert len(trials) == 2 and killed["trial"] in trials
    # The trial restarted on the node that lived (its trial.json is rewritten by each attempt).
    assert trials[killed["trial"]]["node_id"] != killed["node_id"]
    failed = [
        line for line in done.stderr.splitlines() if line.startswith(f"trial {killed['trial']}: attempt 1 failed")
    ]
    assert len(failed) == 1 and "restarts it from its last checkpoint" in failed[0], done.stderr[-3000:]
    # Every milestone once, and the first, stored before the node died, kept as it was (its wall
    # time too): the trial went on from a checkpoint, not from step 0.
    steps = list(range(every, total + 1, every))
    for name in trials:
        rows = [json.loads(line) for line in (experiment / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps, name
    stored = [json.loads(line) for line in killed["stored"].splitlines()]
    after = [json.loads(line) for line in (experiment / killed["trial"] / "metrics.jsonl").read_text().splitlines()]
    assert len(stored) >= 2 and after[0] == stored[0]
    summary = json.loads((experiment / "experiment_summary.json").read_text())
    assert {t["state"] for t in summary["trials"].values()} == {"finished"}


class Driver:
    """`sweep …` in its own process group, as a terminal runs it, its stderr read line by line."""

    def __init__(self, args: list[str], cwd, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=as_from_a_terminal,
        )
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.process.stderr), daemon=True).start()

    def ctrl_c_when(self, moment, timeout: float = 240) -> tuple[int, str]:
        """Send SIGINT to the process group (what Ctrl-C does) once `moment()` is true; return the
        exit code and stderr."""
        deadline = time.time() + timeout
        while not moment():
            if self.process.poll() is not None or time.time() > deadline:
                pytest.fail(f"the moment never came; stderr: {''.join(self.err)[-2000:]}")
            time.sleep(0.05)
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.stdout.read()
        code = self.process.wait(timeout=120)
        time.sleep(0.2)  # the reader thread's last lines
        return code, "".join(self.err)


@needs_fid_weights
def test_ctrl_c_at_any_moment_exits_130_with_no_summary_and_resume_finishes(tmp_path):
    spec = write_spec(
        tmp_path,
        base={
            **TINY_RUN,
            "train": {"total_steps": 60, "batch_size": 8},
            "fid": {"num_samples": 8, "final_num_samples": 0, "ref_num_images": 32},
        },
        search={"optim.lr": {"grid": [1e-4, 2e-4]}},
        max_concurrent=1,
    )
    experiment = tmp_path / "runs" / "tiny"
    summary = experiment / "experiment_summary.json"
    env = {**clean_env(), "SWEEP_FID_WEIGHTS": str(FID_WEIGHTS)}
    run = ["run", str(spec)]

    def milestones() -> dict[str, list[int]]:
        return {
            p.parent.name: [json.loads(line)["step"] for line in p.read_text().splitlines()]
            for p in experiment.glob("*/metrics.jsonl")
        }

    # Before the reference pass: nothing was started, so there is nothing to resume.
    driver = Driver(run, tmp_path, env)
    code, err = driver.ctrl_c_when(lambda: any("FID reference:" in line for line in driver.err))
    assert code == 130 and "nothing to resume: run the same command again" in err, err[-2000:]
    assert not list(experiment.glob("experiment_state-*.json")) and not summary.exists()

    # Before the first milestone: the trials have started, none has reported.
    driver = Driver(run, tmp_path, env)
    code, err = driver.ctrl_c_when(lambda: list(experiment.glob("*/trial.json")))
    assert code == 130 and "`sweep run SPEC --resume` finishes it" in err, err[-2000:]
    assert not summary.exists() and "Tuner.restore" not in err
    status = subprocess.run(
        [sys.executable, "-m", "cli", "status", str(experiment)], capture_output=True, text=True, env=env
    )
    assert "sweep not running: interrupted (Ctrl-C)" in status.stdout, status.stdout

    # Between milestones: once the resumed run has added one.
    before = sum(len(steps) for steps in milestones().values())
    driver = Driver([*run, "--resume"], tmp_path, env)
    code, err = driver.ctrl_c_when(lambda: before < sum(len(steps) for steps in milestones().values()) < 12)
    assert code == 130 and "--resume" in err and not summary.exists(), err[-2000:]
    plan = subprocess.run(
        [sys.executable, "-m", "cli", *run, "--resume", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert plan.returncode == 0 and plan.stdout.startswith(f"resuming {experiment}:"), plan.stdout + plan.stderr
    plans = plan.stdout.splitlines()[1:]
    assert plans[-1] == "    1 more not created yet: start fresh" or len(plans) == 2
    assert all(
        ("kept as it is" in p) or ("continues from its checkpoint at step" in p) or ("start" in p) for p in plans
    )
    assert any("continues from its checkpoint at step" in p for p in plans), plans

    # During the analysis: the sweep itself finished (its summary stands); the analysis can be redone.
    driver = Driver([*run, "--resume"], tmp_path, env)
    code, err = driver.ctrl_c_when(lambda: any("analysing" in line for line in driver.err))
    assert code == 130 and "analysis interrupted" in err and f"sweep analyze {experiment}" in err, err[-2000:]
    assert summary.exists()
    assert {tuple(steps) for steps in milestones().values()} == {(10, 20, 30, 40, 50, 60)} and len(milestones()) == 2
