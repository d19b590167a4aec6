"""Resuming past damage: a checkpoint that cannot be read (the trial falls back to an older one,
or starts over, and keeps every milestone it recorded), the resume plan naming the checkpoint
Ray restores, and a metrics.jsonl that lost its last line. Fast tests of the rules on experiment
folders built with the product's own writers; slow ones drive `sweep run` in its own process."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analysis.status import experiment_status
from analysis.tables import trials_table
from cli.main import app
from diffusion_lib.config import ConfigError
from diffusion_lib.run_files import (
    METRICS_FILE,
    checkpoint_damage,
    checkpoint_name,
    checkpoint_step,
    metrics_line,
    read_metrics,
    write_metrics,
)
from record import states
from record.experiment import load_experiment
from record.files import DRIVER_ENDED_FILE, INTERRUPTED_FILE, resume_order
from record.repair import restore_lost_milestones
from sweeps.closing import lost_milestones
from sweeps.resume_plan import resume_plan

from conftest import (
    tiny_run,
    write_ray_state,
    write_spec,
    write_summary,
    write_sweep_file,
    write_trial,
)

TRIAL = "a1b2c_00000_lr=0.0001"


def row(step: int, wall_time_s: float | None = None) -> dict:
    return {"step": step, "train/loss": 1.0 / step, "wall_time_s": float(step) if wall_time_s is None else wall_time_s}


@pytest.fixture(scope="module")
def checkpoint_bytes() -> bytes:
    """A real checkpoint of a tiny network, written by `save_checkpoint` (its step is in the name)."""
    import tempfile

    import torch

    from diffusion_lib.checkpoint import RunProgress, save_checkpoint
    from diffusion_lib.config import RunConfig
    from diffusion_lib.ema import EMA

    model = torch.nn.Linear(4, 4)
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(
            Path(folder),
            RunProgress(step=20),
            model=model,
            ema=EMA(model, 0.9),
            optimizer=torch.optim.Adam(model.parameters()),
            generator=torch.Generator(),
            config=RunConfig(),
        )
        return path.read_bytes()


def ray_checkpoint(trial: Path, folder: str, step: int, checkpoint: bytes) -> Path:
    """A Ray checkpoint folder as a trial reports one: the trainer checkpoint and the record so far."""
    path = trial / folder / checkpoint_name(step)
    path.parent.mkdir(parents=True)
    path.write_bytes(checkpoint)
    write_metrics(path.parent / METRICS_FILE, [row(s) for s in range(20, step + 1, 20)])
    return path


def record_latest_report(state: Path, trial: str, folder: str, step: int) -> None:
    """Ray's state with the trial's latest report (its checkpoint folder and step) in its run
    metadata's `last_result`, as Ray 2.x keeps it."""
    raw = json.loads(state.read_text())
    for entry in raw["trial_data"]:
        if json.loads(entry[0])["relative_logdir"] == trial:
            metadata = json.loads(entry[1])
            metadata["last_result"] = {"step": step, "checkpoint_dir_name": folder, "done": False}
            entry[1] = json.dumps(metadata)
    stamp = state.stat().st_mtime
    state.write_text(json.dumps(raw))
    os.utime(state, (stamp, stamp))


# ---- the rules, without Ray ------------------------------------------------------------------


def test_a_damaged_checkpoint_is_told_by_its_archive_before_torch_reads_it(tmp_path, checkpoint_bytes):
    """torch.load would load a changed byte's damaged weights; the zip archive's CRCs tell."""
    from diffusion_lib.checkpoint import load_checkpoint

    whole = tmp_path / "whole.pt"
    whole.write_bytes(checkpoint_bytes)
    assert checkpoint_damage(whole) is None and load_checkpoint(whole)["step"] == 20
    damaged = {
        "empty.pt": b"",
        "truncated.pt": checkpoint_bytes[: len(checkpoint_bytes) // 2],
        "flipped.pt": checkpoint_bytes[:-2000] + bytes([checkpoint_bytes[-2000] ^ 0xFF]) + checkpoint_bytes[-1999:],
    }
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        assert checkpoint_damage(tmp_path / name) is not None, name
        with pytest.raises(ConfigError, match=f"{name}: not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    assert checkpoint_damage(tmp_path / "empty.pt") == "empty file"


def test_a_resume_tries_the_checkpoint_ray_restores_then_older_ones_never_newer():
    folders = {"checkpoint_000000": 20, "checkpoint_000003": 80, "checkpoint_000004": 100, "checkpoint_000005": 120}
    paths = [Path(TRIAL, folder, checkpoint_name(step)) for folder, step in folders.items()]
    assert [p.parent.name for p in resume_order(paths, "checkpoint_000004")] == [
        "checkpoint_000004",
        "checkpoint_000003",
        "checkpoint_000000",
    ]  # checkpoint_000005 holds a report Ray never recorded
    assert [p.parent.name for p in resume_order(paths, None)] == sorted(folders, reverse=True)


def test_a_restarted_trial_falls_back_past_damaged_checkpoints_and_keeps_every_recorded_row(tmp_path, checkpoint_bytes):
    """The trainable's restore: Ray restores checkpoint_000004 (emptied); checkpoint_000003 is
    damaged too; checkpoint_000000 is whole. The record in the experiment holds rows past every
    checkpoint; the trial's fresh working directory holds none."""
    from ray import tune

    from sweeps.trainable import resume_point

    trial = tmp_path / "exp" / TRIAL
    first = ray_checkpoint(trial, "checkpoint_000000", 20, checkpoint_bytes)
    ray_checkpoint(trial, "checkpoint_000003", 80, checkpoint_bytes[:-100])
    emptied = ray_checkpoint(trial, "checkpoint_000004", 100, b"")
    recorded = [row(s) for s in range(20, 121, 20)]
    write_metrics(trial / METRICS_FILE, recorded)
    run_dir = tmp_path / "working_dirs" / TRIAL
    run_dir.mkdir(parents=True)
    scratch = tmp_path / "scratch"

    with pytest.warns(UserWarning) as said:
        point = resume_point(tune.Checkpoint(str(emptied.parent)), scratch, run_dir)
    assert point is not None and point.location == str(first)
    assert point.local.read_bytes() == checkpoint_bytes and str(scratch) in str(point.local)
    (line,) = [str(w.message) for w in said]
    assert line.startswith(f"trial {TRIAL}: checkpoint {emptied} unreadable (empty file); checkpoint ")
    assert line.endswith(f"; continues from step 20 ({first})") and str(scratch) not in line
    assert read_metrics(run_dir / METRICS_FILE) == recorded  # rows past the fallback kept, each once

    first.write_bytes(b"")
    with pytest.warns(UserWarning, match="no whole checkpoint left: starts over from step 0"):
        assert resume_point(tune.Checkpoint(str(emptied.parent)), tmp_path / "scratch2", run_dir) is None


def test_a_trial_started_over_keeps_its_earlier_attempts_rows_and_drops_its_events(tmp_path):
    """Ray restarted the trial before any checkpoint of it was stored (a storage outage failed
    the first report's upload): the experiment's trial folder holds the earlier attempt's row
    and TensorBoard events, which the new attempt would otherwise show a second time. Through a
    URI (a file:// one here), as on cloud storage."""
    from sweeps.trainable import start_over

    trial = tmp_path / "exp" / TRIAL
    recorded = [row(30)]
    write_trial(tmp_path / "exp", TRIAL, recorded, searched={})
    (trial / "events.out.tfevents.1.host.1.0").write_bytes(b"an earlier attempt's scalars")
    run_dir = tmp_path / "working_dirs" / TRIAL
    run_dir.mkdir(parents=True)

    start_over(f"file://{trial}", tmp_path / "scratch", run_dir)
    assert read_metrics(run_dir / METRICS_FILE) == recorded  # measured again, step 30 keeps this row
    assert not list(trial.glob("events.out.tfevents.*")) and read_metrics(trial / METRICS_FILE) == recorded
    start_over(str(tmp_path / "exp" / "a_trial_never_started"), tmp_path / "scratch2", run_dir)  # nothing there
    assert read_metrics(run_dir / METRICS_FILE) == recorded


def test_a_resumed_log_keeps_the_recorded_rows_and_records_a_milestone_measured_again_once(tmp_path):
    """A run resumed from step 20 whose record reaches step 60 (and ends in a torn line, as an
    older writer's crash left it): the rows stay as recorded, step 40 measured again is not
    added, step 80 is, and the file is written whole."""
    from diffusion_lib.run_log import RunLog

    run = tmp_path / "run"
    recorded = [row(20), row(40), row(60)]
    write_trial(tmp_path, "run", recorded, searched={}, torn=metrics_line(row(80))[:15])
    log = RunLog.open(run, resume_step=20, hparams={})
    assert log.milestone(row(40, wall_time_s=99.0), grid=None) == row(40)  # the trainer's clock goes on from it
    assert log.milestone(row(80), grid=None) == row(80)
    log.close()
    warnings: list[str] = []
    assert read_metrics(run / METRICS_FILE, warnings) == [*recorded, row(80)] and not warnings


def test_a_ray_state_cut_short_is_refused_by_the_plan_before_ray_would_start_a_trial_without_config(tmp_path):
    """A byte-full disk cut Ray's latest experiment state short: Ray's restore would log the
    failure, drop every trial and start one with an empty config. The plan (and `sweep run
    --resume`, tests/test_resume_faults.py's SIGTERM case) refuses it, naming the file; an
    older, whole state beside it does not matter, since Ray reads the latest."""
    experiment = tmp_path / "runs" / "tiny"
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4]}}, metric="train/loss")
    write_trial(experiment, TRIAL, [row(20)], searched={"optim.lr": 1e-4}, total_steps=40)
    older = write_ray_state(experiment, {TRIAL: "RUNNING"})
    latest = older.with_name("experiment_state-2026-01-02_00-00-00.json")
    latest.write_text(older.read_text())
    assert resume_plan(str(experiment), num_trials=1)[1].startswith(f"    {TRIAL}  ")
    latest.write_text(older.read_text()[:100])
    with pytest.raises(ConfigError, match=f"Ray's experiment state {latest.name} is unreadable"):
        resume_plan(f"file://{experiment}", num_trials=1)  # on a URI, the state files alone are fetched
    with pytest.raises(ConfigError) as refused:
        resume_plan(str(experiment), num_trials=1)
    assert str(refused.value).startswith(
        f"--resume: Ray's experiment state {latest.name} is unreadable (JSONDecodeError: "
    ) and str(refused.value).endswith(
        f"so Ray cannot resume the sweep; the trials' records stand: "
        f"`sweep status {experiment}` and `sweep analyze {experiment}` read them"
    )


def test_the_plan_names_the_checkpoint_ray_restores_and_where_a_damaged_one_falls_back_to(tmp_path, checkpoint_bytes):
    """Ray's state records checkpoint_000004 (step 100); checkpoint_000005 (step 120) was written
    after the driver's last save of it. The plan reads the same on a URI (a file:// one here)."""
    experiment = tmp_path / "exp"
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4]}}, metric="train/loss")
    rows = [row(s) for s in range(20, 121, 20)]
    trial = write_trial(experiment, TRIAL, rows, searched={"optim.lr": 1e-4}, total_steps=200)
    ray_checkpoint(trial, "checkpoint_000000", 20, checkpoint_bytes)
    restored = ray_checkpoint(trial, "checkpoint_000004", 100, checkpoint_bytes)
    ray_checkpoint(trial, "checkpoint_000005", 120, checkpoint_bytes)
    state = write_ray_state(experiment, {TRIAL: "RUNNING"}, age_s=600)  # the driver is gone

    def plan_line(location: str) -> str:
        lines = resume_plan(location, num_trials=1)
        assert lines[0] == f"resuming {location}:" and len(lines) == 2, lines
        return lines[1]

    assert plan_line(str(experiment)).endswith("interrupted: continues from its checkpoint at step 120")  # no report
    record_latest_report(state, TRIAL, "checkpoint_000004", 100)
    assert plan_line(str(experiment)) == f"    {TRIAL}  interrupted: continues from its checkpoint at step 100"
    restored.write_bytes(b"")
    falls_back = (
        f"    {TRIAL}  interrupted: checkpoint at step 100 unreadable (empty file); "
        "continues from its checkpoint at step 20"
    )
    assert plan_line(str(experiment)) == falls_back
    assert plan_line(f"file://{experiment}") == falls_back


def record_ray_run_metadata(state: Path, trial: str, kept: dict[str, int], last_report: tuple[str, int]) -> None:
    """The trial's run metadata in Ray's state as Ray writes it, with Ray's own classes and
    encoder: its checkpoint manager holding the `kept` checkpoint folders (folder: step, in
    order), and `last_report` (folder, step) as its latest report."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    metadata = _TrainingRunMetadata()
    metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=len(kept)))
    for folder, step in kept.items():
        checkpoint = Checkpoint(str(state.parent / trial / folder))
        metadata.checkpoint_manager.register_checkpoint(_TrainingResult(checkpoint, {"step": step}))
    metadata.last_result = {"step": last_report[1], "checkpoint_dir_name": last_report[0], "done": False}
    raw = json.loads(state.read_text())
    for entry in raw["trial_data"]:
        if json.loads(entry[0])["relative_logdir"] == trial:
            entry[1] = metadata.get_json_state()
    stamp = state.stat().st_mtime
    state.write_text(json.dumps(raw))
    os.utime(state, (stamp, stamp))


def test_the_plan_reads_the_checkpoint_ray_restores_from_its_checkpoint_manager_without_ray(tmp_path, checkpoint_bytes):
    """Ray saved its state between the step-60 report and the registration of its checkpoint: the
    report names checkpoint_000002, and Ray's checkpoint manager, which Ray restores from, holds
    checkpoint_000001 (step 40) as its latest. Read without Ray: its pickle's classes are stand-ins."""
    experiment = tmp_path / "exp"
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4]}}, metric="train/loss")
    trial = write_trial(experiment, TRIAL, [row(s) for s in (20, 40, 60)], searched={"optim.lr": 1e-4}, total_steps=100)
    for index, step in enumerate((20, 40, 60)):
        ray_checkpoint(trial, f"checkpoint_00000{index}", step, checkpoint_bytes)
    state = write_ray_state(experiment, {TRIAL: "RUNNING"}, age_s=600)
    record_ray_run_metadata(state, TRIAL, {"checkpoint_000000": 20, "checkpoint_000001": 40}, ("checkpoint_000002", 60))
    code = "import sys, record.experiment; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

    assert load_experiment(experiment).trials[0].ray_checkpoint == "checkpoint_000001"
    assert resume_plan(str(experiment), num_trials=1)[1] == (
        f"    {TRIAL}  interrupted: continues from its checkpoint at step 40"
    )
    record_ray_run_metadata(state, TRIAL, {"checkpoint_000000": 20, "checkpoint_000002": 60}, ("checkpoint_000002", 60))
    assert load_experiment(experiment).trials[0].ray_checkpoint == "checkpoint_000002"


def test_a_checkpoint_manager_that_is_not_rays_runs_nothing_and_the_latest_report_stands(tmp_path):
    from record.ray_checkpoint import restored_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    pickled = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Payload()).hex()}}
    assert restored_checkpoint(pickled) is None and not (tmp_path / "ran").exists()
    assert restored_checkpoint({}) is None and restored_checkpoint({"checkpoint_manager": None}) is None


def test_a_finished_trial_whose_record_lost_its_last_row_reads_finished_and_gets_it_back(tmp_path):
    """The summary says finished; metrics.jsonl ends in a torn line (step 40 of 40); the trial's
    newest checkpoint holds the record as it was reported."""
    experiment = tmp_path / "exp"
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4]}}, metric="train/loss")
    rows = [row(20), row(40)]
    trial = write_trial(
        experiment, TRIAL, rows[:1], torn=metrics_line(rows[1])[:25], searched={"optim.lr": 1e-4}, total_steps=40
    )
    write_summary(experiment, {TRIAL: states.FINISHED})

    read = load_experiment(experiment)
    (lacking,) = read.trials
    assert (lacking.state, lacking.note) == (states.FINISHED, states.LACKS_ITS_END) and lacking.lacks_its_end
    assert trials_table(read).column("state").to_pylist() == [states.FINISHED]  # the analysis says the same
    (line,) = [line for line in experiment_status(experiment).lines if line.startswith(TRIAL)]
    assert " finished " in line and " 20/40 " in line and line.endswith(states.LACKS_ITS_END)
    assert resume_plan(str(experiment), num_trials=1)[1] == (
        f"    {TRIAL}  finished: kept; the milestones its metrics.jsonl lost are put back from its checkpoints' copies"
    )
    # Without the summary (killed before it was written): Ray's report of the last step says finished.
    (experiment / "experiment_summary.json").unlink()
    record_latest_report(write_ray_state(experiment, {TRIAL: "TERMINATED"}), TRIAL, "checkpoint_000001", 40)
    assert [(t.state, t.note) for t in load_experiment(experiment).trials] == [(states.FINISHED, states.LACKS_ITS_END)]

    # No copy holds the row: it stays lost, and `sweep run` says so (its exit code is then 1).
    assert restore_lost_milestones(str(experiment)) == []
    assert lost_milestones(str(experiment)) == (
        "1 trial finished with milestones lost from metrics.jsonl that no checkpoint holds "
        f"(they cannot be measured again): {TRIAL} (ends at step 20 of 40)"
    )
    # The newest checkpoint's copy holds it: put back (through a URI, as on cloud storage).
    write_metrics(trial / "checkpoint_000001" / METRICS_FILE, rows)
    assert restore_lost_milestones(f"file://{experiment}") == [
        f"trial {TRIAL}: its metrics.jsonl had lost the milestones at step 40; put back from its checkpoints' copies"
    ]
    warnings: list[str] = []
    assert read_metrics(trial / METRICS_FILE, warnings) == rows and not warnings
    assert lost_milestones(str(experiment)) is None
    assert [(t.state, t.note) for t in load_experiment(experiment).trials] == [(states.FINISHED, "")]


# ---- `sweep run` in its own process ----------------------------------------------------------


class Sweep:
    """A one-trial sweep over the tiny run, each `sweep` command in its own process."""

    def __init__(self, tmp_path: Path, total_steps: int, **fields):
        self.spec = write_spec(
            tmp_path,
            base=tiny_run(train={"total_steps": total_steps}, eval={"every": 20}),
            search={"optim.lr": {"grid": [1e-4]}},
            **fields,
        )
        self.cwd = tmp_path
        self.experiment = tmp_path / "runs" / "tiny"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli", *args]

    def run(self, *options: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command("run", str(self.spec), "--no-analyze", *options),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> str:
        return subprocess.run(
            self.command("status", str(self.experiment)), capture_output=True, text=True, env=self.env, check=True
        ).stdout

    def trial(self) -> Path:
        (trial,) = [p for p in self.experiment.iterdir() if p.is_dir()]
        return trial

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.trial() / METRICS_FILE).read_text().splitlines()]

    def sigterm_once_recorded(self, step: int) -> subprocess.CompletedProcess:
        """`sweep run`'s whole process group sent SIGTERM (systemd stopping a service, Slurm's
        `scancel`), Ray's own processes with it, once the trial recorded `step`. (SIGTERM to the
        driver alone, as a container's stop sends it, takes the path Ctrl-C takes:
        tests/test_sweep_processes.py.)"""
        driver = subprocess.Popen(
            self.command("run", str(self.spec), "--no-analyze"),
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while not any(r["step"] >= step for r in self._rows_so_far()):
            if driver.poll() is not None or time.time() > deadline:
                os.killpg(driver.pid, signal.SIGKILL)
                pytest.fail(f"the trial never recorded step {step}: {driver.communicate()[1][-2000:]}")
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
        return subprocess.CompletedProcess(driver.args, driver.returncode, "", err)

    def _rows_so_far(self) -> list[dict]:
        return [r for path in self.experiment.glob(f"*/{METRICS_FILE}") for r in read_metrics(path)]

    def restored_by_ray(self) -> str:
        """The checkpoint folder `--resume` restores: the latest in the trial's checkpoint manager
        in Ray's newest state, unpickled by Ray itself."""
        from ray.tune.utils.serialization import _loads_with_cloudpickle

        newest = max(self.experiment.glob("experiment_state-*.json"))
        (entry,) = json.loads(newest.read_text())["trial_data"]
        manager = _loads_with_cloudpickle(entry[1])["checkpoint_manager"]
        return Path(manager.latest_checkpoint_result.checkpoint.path).name


@pytest.mark.slow
def test_sigterm_then_a_damaged_checkpoint_named_planned_for_and_resumed_past_then_a_torn_row_made_whole(tmp_path):
    """One sweep for four points (each sweep started costs the suite seconds of imports and Ray): SIGTERM
    to the process group mid-trial ends it as Ctrl-C does, though Ray's own processes died of it
    (Ray Tune would wait on them for a minute, then die of a native error, its trials' workers
    training on); the checkpoint Ray restores emptied, then the plan
    (--resume --dry-run) and the resume, which also removes the interruption note; then the
    finished trial's last row torn, and resumed. The metric's mode is max, so that Ray keeps the
    first milestone's checkpoint (the highest loss) beside the newest: the one to fall back to.
    Ctrl-C itself (SIGINT to the process group) is tests/test_sweep_processes.py's."""
    sweep = Sweep(tmp_path, total_steps=100, mode="max")
    stopped = sweep.sigterm_once_recorded(step=60)
    # Ray saves its state, one line says how to resume, exit 143 — no native stack, no traceback.
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-2:] == [
        "the stop signal also ended Ray's own processes (sent to the whole process group); workers stopped",
        "interrupted with trials unfinished; the state is saved: `sweep run SPEC --resume` finishes it",
    ], stopped.stderr[-3000:]
    assert len([line for line in stopped.stderr.splitlines() if "--resume" in line]) == 1
    assert "SIGTERM received" not in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (sweep.experiment / INTERRUPTED_FILE).is_file()
    assert "sweep not running: interrupted (Ctrl-C or SIGTERM)" in sweep.status()
    trial = sweep.trial()
    folder = sweep.restored_by_ray()
    # Every checkpoint from the one Ray restores back to the oldest is emptied (Ray's state, saved
    # as SIGTERM lands, can name a newer report's checkpoint that Ray has not taken yet).
    stored = sorted(trial.glob("checkpoint_*/step_*.pt"), reverse=True)
    emptied = [path for path in stored if stored[-1].parent.name < path.parent.name <= folder]
    assert emptied and emptied[0].parent.name == folder, "the case needs a checkpoint older than the one Ray restores"
    for path in emptied:
        path.write_bytes(b"")
    fallback = stored[-1]
    fallback_step = int(fallback.stem.removeprefix("step_"))
    before = sweep.rows()

    # The plan: the checkpoint Ray restores (not the record's newest, which may be a report newer)
    # and each older one, unreadable, and the one the trial will continue from.
    plan = CliRunner().invoke(app, ["run", str(sweep.spec), "--no-analyze", "--resume", "--dry-run"])
    assert plan.exit_code == 0, plan.output[-2000:]
    unreadable = "; ".join(
        f"checkpoint at step {checkpoint_step(path.name)} unreadable (empty file)" for path in emptied
    )
    assert plan.stdout.splitlines()[1:] == [
        f"    {trial.name}  interrupted: {unreadable}; continues from its checkpoint at step {fallback_step}"
    ], plan.stdout

    # The resume: the damaged files named where they are in the experiment, the fallback said in
    # one line, the trial finished, every milestone once, those recorded before kept as they were.
    resumed = sweep.run("--resume")
    said = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, said[-3000:]
    fell_back = f"unreadable (empty file); continues from step {fallback_step} ({fallback})"
    assert any(
        f"trial {trial.name}: checkpoint " in line
        and f"checkpoint {emptied[-1]} unreadable (empty file)" in line
        and line.endswith(fell_back)
        for line in said.splitlines()
    ), said[-3000:]
    assert "trial-ckpt-" not in said
    after = sweep.rows()
    assert [r["step"] for r in after] == [20, 40, 60, 80, 100]
    assert after[: len(before)] == before
    wall_times = [r["wall_time_s"] for r in after]
    assert wall_times == sorted(wall_times)  # the clock went on from the recorded rows, not from step 20's
    assert json.loads((sweep.experiment / "experiment_summary.json").read_text())["trials"] == {
        trial.name: {"state": "finished", "error": None, "traceback": None}
    }
    assert not (sweep.experiment / INTERRUPTED_FILE).exists()  # the resumed sweep ended: the note is history
    status = sweep.status()
    assert "sweep ended" in status and "interrupted" not in status, status

    # Then its last row torn (a crash mid-write): status reads it finished, short of its end, and
    # a resume puts the row back from the checkpoint's copy of the record.
    (trial / METRICS_FILE).write_text("".join(metrics_line(r) for r in after[:-1]) + metrics_line(after[-1])[:30])
    (line,) = [line for line in sweep.status().splitlines() if line.startswith(trial.name)]
    assert " finished " in line and " 80/100 " in line and line.endswith(states.LACKS_ITS_END), line
    repaired = sweep.run("--resume")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert f"trial {trial.name}: its metrics.jsonl had lost the milestones at step 100" in repaired.stderr
    assert sweep.rows() == after
    (line,) = [line for line in sweep.status().splitlines() if line.startswith(trial.name)]
    assert " finished " in line and " 100/100 " in line and not line.endswith(states.LACKS_ITS_END)

    # Then Ray's latest state cut short (a byte-full disk): the resume is refused before Ray
    # starts, and changes nothing but the driver's own note of its end (in this process: the
    # refusal comes before any torch or Ray work).
    state = max(sweep.experiment.glob("experiment_state-*.json"))
    state.write_text(state.read_text()[:500])

    def record() -> dict[Path, int]:
        return {
            p: p.stat().st_mtime_ns for p in sweep.experiment.rglob("*") if p.is_file() and p.name != DRIVER_ENDED_FILE
        }

    before_refusal = record()
    refused = CliRunner().invoke(app, ["run", str(sweep.spec), "--no-analyze", "--resume"])
    assert refused.exit_code == 2 and f"--resume: Ray's experiment state {state.name} is unreadable" in refused.output
    assert record() == before_refusal
