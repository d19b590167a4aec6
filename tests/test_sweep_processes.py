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
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

from conftest import FID_WEIGHTS, REPO, as_from_a_terminal, needs_fid_weights, tiny_run, write_spec

pytestmark = pytest.mark.slow  # every test here runs sweeps in their own processes


def clean_env() -> dict[str, str]:
    """This machine's environment without any Ray cluster address another test left behind."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_kill_minus_9_then_resume_finishes_without_recomputing(tmp_path):
    """The racing scheduler's rungs survive the kill too: z = 100 stops nothing, so every trial
    runs to its end, and its rung at step 20 ends up holding both trials only if the records
    made before the kill were restored (the interrupted trial resumes past step 20)."""
    spec = write_spec(
        tmp_path,
        base=tiny_run(train={"total_steps": 60}, eval={"every": 20}, curvature={"probes": 2}),
        search={"optim.lr": {"grid": [1e-4, 2e-4]}},
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
        done = [t for t, rows in found.items() if rows and rows[-1]["step"] == 60]
        started = [
            t
            for t, rows in found.items()
            if rows and rows[-1]["step"] < 60 and list((experiment / t).glob("checkpoint_*"))
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
    assert len(after) == 2
    assert all([r["step"] for r in rows] == [20, 40, 60] for rows in after.values())
    assert (experiment / done[0] / "metrics.jsonl").read_text() == finished_before  # not recomputed
    interrupted = started[0]
    assert after[interrupted][0] == before[interrupted][0]  # resumed from a checkpoint, not step 0 (wall time included)
    assert "Rung step 20 (2 trials)" in resumed.stdout  # not (0 trials): the records before the kill were restored
    # Without --resume, the existing experiment is refused rather than overwritten.
    again = CliRunner().invoke(app, ["run", str(spec), "--no-analyze"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_a_node_dies_and_its_trial_resumes_on_the_other_from_its_checkpoint(tmp_path):
    """`sweep run --address` against a two-node Ray cluster (ray.cluster_utils on one machine),
    each in its own process as a user would run them; the worker node's raylet is killed
    (kill -9) while a trial runs there with checkpoints stored."""
    total, every = 80, 20
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
                if self.process.poll() is None:
                    os.killpg(self.process.pid, signal.SIGKILL)  # no sweep left running after the test
                pytest.fail(f"the moment never came; stderr: {''.join(self.err)[-2000:]}")
            time.sleep(0.05)
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.stdout.read()
        code = self.process.wait(timeout=120)
        time.sleep(0.2)  # the reader thread's last lines
        return code, "".join(self.err)


class CtrlCSweep:
    """A grid sweep run one trial at a time, each `sweep run` of it in its own process as a terminal
    runs it."""

    def __init__(self, tmp_path, *, trials: int, total_steps: int, fid: bool):
        self.steps = list(range(10, total_steps + 1, 10))
        fid_section = {"num_samples": 8, "final_num_samples": 0, "ref_num_images": 32} if fid else {}
        spec = write_spec(
            tmp_path,
            base=tiny_run(train={"total_steps": total_steps}, fid=fid_section),
            search={"optim.lr": {"grid": [1e-4, 2e-4, 3e-4][:trials]}},
            max_concurrent=1,
        )
        self.cwd = tmp_path
        self.run = ["run", str(spec)]
        self.experiment = tmp_path / "runs" / "tiny"
        self.summary = self.experiment / "experiment_summary.json"
        self.env = {**clean_env(), "SWEEP_FID_WEIGHTS": str(FID_WEIGHTS)}

    def start(self, *options: str) -> Driver:
        return Driver([*self.run, *options], self.cwd, self.env)

    def trial_folders(self) -> list[Path]:
        """The folders Ray has made for trials (the experiment's only folders, without FID)."""
        return [p for p in self.experiment.glob("*") if p.is_dir()]

    def milestones(self) -> dict[str, list[int]]:
        """Each trial's milestone steps, by trial folder."""
        return {
            p.parent.name: [json.loads(line)["step"] for line in p.read_text().splitlines()]
            for p in self.experiment.glob("*/metrics.jsonl")
        }

    def stored_checkpoints(self) -> dict[str, list[int]]:
        """Each trial's steps with a checkpoint stored in the experiment (what --resume continues from)."""
        found: dict[str, list[int]] = {}
        for path in self.experiment.glob("*/checkpoint_*/step_*.pt"):
            found.setdefault(path.parent.parent.name, []).append(int(path.stem.removeprefix("step_")))
        return {trial: sorted(steps) for trial, steps in found.items()}

    def newest_stored_step(self) -> int:
        return max((max(steps) for steps in self.stored_checkpoints().values()), default=0)

    def restored_step(self, trial: str) -> int:
        """The step of the trial's latest report in Ray's newest experiment state: the checkpoint
        `--resume` restores (a report newer than Ray's last save of its state is not)."""
        newest = max(self.experiment.glob("experiment_state-*.json"))
        for trial_json, run_metadata in json.loads(newest.read_text())["trial_data"]:
            if json.loads(trial_json)["relative_logdir"] == trial:
                return json.loads(run_metadata)["last_result"]["step"]
        raise AssertionError(f"{trial} is not in Ray's state")

    def status(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "status", str(self.experiment)], capture_output=True, text=True, env=self.env
        )
        return done.stdout

    def resume_plan(self) -> list[str]:
        """`sweep run SPEC --resume --dry-run`, in this process (it starts nothing)."""
        done = CliRunner().invoke(app, [*self.run, "--resume", "--dry-run"])
        assert done.exit_code == 0, done.output
        return done.stdout.splitlines()


# Six milestones of one trial, FID by the real Inception (the launcher's reference pass included).
WITH_FID = {"trials": 1, "total_steps": 60, "fid": True}
# One trial of three milestones, no FID: a sweep that gets to its analysis soon.
ONE_SHORT_TRIAL = {"trials": 1, "total_steps": 30, "fid": False}
# Two trials, no FID, the first far longer than a case waits: it never ends before the Ctrl-C lands.
LONG_TRIALS = {"trials": 2, "total_steps": 600, "fid": False}


def trial_started_none_reported(sweep: CtrlCSweep) -> bool:
    """Ray has made the first trial's folder (as it starts the trial); the trial's own files arrive
    with its first report."""
    return bool(sweep.trial_folders()) and not sweep.milestones()


def before_the_reference_pass(tmp_path) -> None:
    """Nothing was started, so there is nothing to resume."""
    sweep = CtrlCSweep(tmp_path, **WITH_FID)
    driver = sweep.start()
    code, err = driver.ctrl_c_when(lambda: any("FID reference:" in line for line in driver.err))
    assert code == 130 and "nothing to resume: run the same command again" in err, err[-2000:]
    assert not list(sweep.experiment.glob("experiment_state-*.json")) and not sweep.summary.exists()


def before_the_first_milestone_then_between_milestones_of_the_resumed_run(tmp_path) -> None:
    """The trials have started, none has reported: the run says how to finish it, status says why
    it stopped. Then the resumed run, stopped once it has stored a checkpoint of its own: the first
    trial (one at a time) continues from its newest stored checkpoint, the second is still to be
    created. (One case: the second moment starts from the first.)"""
    sweep = CtrlCSweep(tmp_path, **LONG_TRIALS)
    code, err = sweep.start().ctrl_c_when(lambda: trial_started_none_reported(sweep))
    assert code == 130 and "`sweep run SPEC --resume` finishes it" in err, f"before the first milestone: {err[-2000:]}"
    assert not sweep.summary.exists() and "Tuner.restore" not in err
    status = sweep.status()
    assert "sweep not running: interrupted (Ctrl-C or SIGTERM)" in status, f"before the first milestone: {status}"

    before = sweep.newest_stored_step()
    driver = sweep.start("--resume")
    code, err = driver.ctrl_c_when(lambda: sweep.newest_stored_step() > before)
    assert code == 130 and "`sweep run SPEC --resume` finishes it" in err and not sweep.summary.exists(), err[-2000:]
    (trial,) = sweep.milestones()  # one trial at a time: the second is not created yet
    newest = max(sweep.stored_checkpoints()[trial])
    assert before < newest < sweep.steps[-1] and newest in sweep.milestones()[trial]
    # Interrupted, not pending: the trial ran and stored a checkpoint (Ray's state of this run says
    # RUNNING; the state of the run it resumed, still beside it, said PENDING). It continues from
    # the checkpoint Ray restores, which can be a milestone older than the newest stored.
    restored = sweep.restored_step(trial)
    assert restored in sweep.stored_checkpoints()[trial]
    assert sweep.resume_plan() == [
        f"resuming {sweep.experiment}:",
        f"    {trial}  interrupted: continues from its checkpoint at step {restored}",
        "    1 more not created yet: start fresh",
    ]


def during_the_analysis(tmp_path) -> None:
    """A run stopped while it analyses: the sweep itself finished (its summary stands, every
    milestone once) and the analysis can be redone."""
    sweep = CtrlCSweep(tmp_path, **ONE_SHORT_TRIAL)
    driver = sweep.start()
    code, err = driver.ctrl_c_when(lambda: any("analysing" in line for line in driver.err))
    assert code == 130 and "analysis interrupted" in err and f"sweep analyze {sweep.experiment}" in err, err[-2000:]
    assert sweep.summary.exists()
    milestones = sweep.milestones()
    assert list(milestones.values()) == [sweep.steps], milestones


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param(before_the_reference_pass, marks=needs_fid_weights),
        before_the_first_milestone_then_between_milestones_of_the_resumed_run,
        during_the_analysis,
    ],
    ids=lambda moment: moment.__name__,
)
def test_ctrl_c_exits_130_and_says_how_to_go_on(tmp_path, moment):
    moment(tmp_path)
