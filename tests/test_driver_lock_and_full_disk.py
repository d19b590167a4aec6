"""One driver per experiment (record.driver_lock), and a full disk said in one line
(sweeps.runner.NoSpaceLeft) leaving a record that `sweep status` reads truthfully and
`sweep run --resume` finishes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from analysis.status import experiment_status
from cli.main import app
from diffusion_lib.config import ConfigError
from record.driver_lock import DriverLock, refuse_if_driven
from record.files import DRIVER_ENDED_FILE, DRIVER_LOCK_FILE

from conftest import (
    REPO,
    StandInFeatures,
    as_from_a_terminal,
    start_test_ray,
    tiny_run,
    write_ray_state,
    write_spec,
    write_sweep_file,
)

HOST = socket.gethostname()


def clean_env() -> dict[str, str]:
    """This machine's environment without any Ray cluster address another test left behind."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def a_killed_driver(experiment: Path) -> int:
    """The lock a `sweep run` killed mid-sweep leaves behind: taken by a process that then ended
    without giving it back. Returns that process's pid."""
    code = f"from record.driver_lock import DriverLock; DriverLock.take({str(experiment)!r}, print)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    assert process.wait(timeout=60) == 0
    return process.pid


def a_driver_on_another_host(experiment: Path, monkeypatch) -> DriverLock:
    """A lock taken by a `sweep run` on host `elsewhere` (as the shared storage shows it here)."""
    with monkeypatch.context() as patched:
        patched.setattr(socket, "gethostname", lambda: "elsewhere")
        return DriverLock.take(str(experiment), print)


# ---- the lock --------------------------------------------------------------------------------


def test_a_second_driver_is_refused_naming_the_first_and_may_drive_once_it_is_given_back(tmp_path):
    experiment = tmp_path / "runs" / "tiny"
    said = []
    first = DriverLock.take(str(experiment), said.append)
    assert json.loads((experiment / DRIVER_LOCK_FILE).read_text())["pid"] == os.getpid()
    refused = rf"driven by another `sweep run` \(pid {os.getpid()} on host {HOST}, "
    with pytest.raises(ConfigError, match=refused):
        DriverLock.take(str(experiment), said.append)
    with pytest.raises(ConfigError, match=refused):  # what `sweep run` checks before it loads torch and Ray
        refuse_if_driven(str(experiment.parent), str(experiment))
    first.give_back()
    refuse_if_driven(str(experiment.parent), str(experiment))
    assert not (experiment / DRIVER_LOCK_FILE).exists() and (experiment / DRIVER_ENDED_FILE).exists()
    with DriverLock.take(str(experiment), said.append):
        assert (experiment / DRIVER_LOCK_FILE).exists()
    assert not (experiment / DRIVER_LOCK_FILE).exists() and said == []


def test_a_killed_drivers_lock_is_taken_over_on_its_host_saying_so(tmp_path):
    experiment = tmp_path / "tiny"
    dead = a_killed_driver(experiment)
    refuse_if_driven(str(experiment.parent), str(experiment))  # `sweep run` goes on to take the lock over
    said = []
    with DriverLock.take(str(experiment), said.append):
        assert json.loads((experiment / DRIVER_LOCK_FILE).read_text())["pid"] == os.getpid()
    (line,) = said
    assert line.startswith(f"warning: {experiment / DRIVER_LOCK_FILE}: its driver (pid {dead} on host {HOST}, ")
    assert line.endswith("no longer runs; this run takes over")


def test_a_lock_from_another_host_is_refused_with_how_to_override(tmp_path, monkeypatch):
    experiment = tmp_path / "tiny"
    a_driver_on_another_host(experiment, monkeypatch)
    with pytest.raises(ConfigError) as refused:
        DriverLock.take(str(experiment), print)
    assert "a `sweep run` on another host (pid" in str(refused.value) and "on host elsewhere" in str(refused.value)
    assert str(refused.value).endswith(f"delete {experiment / DRIVER_LOCK_FILE} and run again")


def test_an_unreadable_lock_is_refused_naming_it(tmp_path):
    (tmp_path / DRIVER_LOCK_FILE).write_text("")  # as a crash between its creation and its content leaves it
    with pytest.raises(ConfigError, match="unreadable driver lock .* delete it and run again"):
        DriverLock.take(str(tmp_path), print)


# ---- status reads the lock -------------------------------------------------------------------


def an_experiment_mid_run(experiment: Path, *, ray_state_age_s: float) -> None:
    """sweep.json and Ray's state with one trial running, Ray's state `ray_state_age_s` old."""
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4]}})
    write_ray_state(experiment, {"t1_lr=0.0001": "RUNNING"}, age_s=ray_state_age_s)


def test_status_asks_the_lock_whether_the_driver_lives_rather_than_guessing_from_file_ages(tmp_path, monkeypatch):
    # A live driver whose Ray state is an hour old (a long milestone): running, not "killed".
    live = tmp_path / "live"
    lock = DriverLock.take(str(live), print)
    an_experiment_mid_run(live, ray_state_age_s=3600)
    report = experiment_status(live)
    assert f"sweep running (Ray's driver wrote its state 60 min ago; its driver: pid {os.getpid()}" in report.header
    assert report.by_name()["t1_lr=0.0001"].state == "running"
    # The driver ended on an error (a full disk writes no summary): not running at once.
    lock.give_back()
    report = experiment_status(live)
    assert f"sweep not running: its driver (pid {os.getpid()} on host {HOST}, " in report.header
    assert "ended without finishing the sweep" in report.header and "--resume" in report.header
    assert report.by_name()["t1_lr=0.0001"].state == "interrupted"

    # Killed (its pid is gone) a second after Ray last wrote its state: not running either.
    killed = tmp_path / "killed"
    dead = a_killed_driver(killed)
    an_experiment_mid_run(killed, ray_state_age_s=1)
    report = experiment_status(killed)
    assert f"its driver (pid {dead} on host {HOST}, " in report.header and "no longer runs (killed" in report.header
    assert report.by_name()["t1_lr=0.0001"].state == "interrupted"

    # A driver on another host cannot be asked from here: Ray's heartbeat decides, as before the lock.
    elsewhere = tmp_path / "elsewhere"
    a_driver_on_another_host(elsewhere, monkeypatch)
    an_experiment_mid_run(elsewhere, ray_state_age_s=0)
    assert "sweep running (Ray's driver wrote its state 0 s ago; its driver: pid" in experiment_status(elsewhere).header


def test_dry_runs_and_status_do_not_need_the_lock_and_leave_it_as_it_is(tmp_path):
    spec = write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}})
    experiment = tmp_path / "runs" / "tiny"
    with DriverLock.take(str(experiment), print):
        an_experiment_mid_run(experiment, ray_state_age_s=0)
        held = (experiment / DRIVER_LOCK_FILE).read_text()
        for args in (["run", str(spec), "--dry-run"], ["run", str(spec), "--resume", "--dry-run"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
        status = CliRunner().invoke(app, ["status", str(experiment)])
        assert status.exit_code == 0 and "sweep running" in status.output, status.output
        assert (experiment / DRIVER_LOCK_FILE).read_text() == held


# ---- a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` for the block (skipped where it cannot be mounted:
    not root, or no tmpfs), unmounted after it (lazily: a Ray worker may still hold a file)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_disk_too_small_for_the_fid_reference_leaves_nothing_to_confuse_resume(tmp_path, monkeypatch):
    """The 3 MiB case: the reference (4 MiB here) cannot be stored, before any trial. The run says
    it in one line and removes what it made, so a plain rerun starts afresh and `--resume` says
    there is nothing to resume. Ray is not needed this early: it is left out."""
    import sweeps.runner as runner
    from sweeps.spec import load_spec

    with small_disk(tmp_path / "disk", "3m") as disk:
        spec = load_spec(
            write_spec(
                tmp_path,
                storage=str(disk / "runs"),
                base=tiny_run(fid={"num_samples": 8, "final_num_samples": 0, "ref_num_images": 32}),
                search={"optim.lr": {"grid": [1e-4]}},
            ),
            [f"fid.cache_dir={tmp_path / 'cache'}"],
        )
        monkeypatch.setattr(runner, "start_ray", lambda address: None)
        monkeypatch.setattr(runner, "ray_cluster_resources", lambda: {"CPU": 2.0})
        monkeypatch.setattr(runner, "describe_cluster", lambda cluster: "Ray stand-in")
        with pytest.raises(runner.NoSpaceLeft) as full:
            runner.run_sweep(spec, features=StandInFeatures(dims=512))
        experiment = disk / "runs" / "tiny"
        assert str(full.value) == (
            f"no space left on device writing {experiment}; free space there, then run the same command again"
        )
        assert list(disk.iterdir()) == []  # the storage folder this run made is gone too
        with pytest.raises(ConfigError, match="--resume: no experiment to resume"):
            runner.run_sweep(spec, resume=True)
        assert list(disk.iterdir()) == []


@pytest.fixture
def local_ray():
    import ray

    start_test_ray()
    yield
    ray.shutdown()


def fill_after_the_first_checkpoint(experiment: Path, disk: Path, done: threading.Event) -> None:
    """Once the trial has stored its first checkpoint, fill the disk to half a checkpoint short of
    the room the next one needs (its size and 1 MiB for the record's own files)."""
    while not done.is_set():
        stored = list(experiment.glob("*/checkpoint_*/step_*.pt"))
        if stored:
            with contextlib.suppress(OSError):  # caught mid-copy: its size is not final yet
                size = stored[0].stat().st_size
                if size > 0:
                    room = (1 << 20) + size // 2
                    (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - room))
                    return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_disk_full_mid_trial_is_one_line_status_says_errored_and_resume_finishes(tmp_path, local_ray):
    with small_disk(tmp_path / "disk", "16m") as disk:
        spec = write_spec(
            tmp_path,
            storage=str(disk / "runs"),
            base=tiny_run(train={"total_steps": 40}),
            search={"optim.lr": {"grid": [1e-4]}},
        )
        experiment = disk / "runs" / "tiny"
        done = threading.Event()
        filler = threading.Thread(target=fill_after_the_first_checkpoint, args=(experiment, disk, done), daemon=True)
        filler.start()
        try:
            result = CliRunner().invoke(app, ["run", str(spec), "--no-analyze"])
        finally:
            done.set()
            filler.join()
        assert result.exit_code == 1, result.output
        assert (disk / "filler").exists(), "the trial ended before the disk was filled"
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: no space left on device writing {experiment}; "
            "free space there, then `sweep run SPEC --resume` finishes it"
        ], result.output
        assert "Traceback" not in result.output
        status = experiment_status(experiment)
        assert "sweep running" not in status.header and [t.state for t in status.trials] == ["errored"]

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = CliRunner().invoke(app, ["run", str(spec), "--resume", "--no-analyze"])
        assert resumed.exit_code == 0, resumed.output
        (metrics,) = experiment.glob("*/metrics.jsonl")
        assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [10, 20, 30, 40]
        assert not (experiment / DRIVER_LOCK_FILE).exists() and (experiment / DRIVER_ENDED_FILE).exists()


# ---- two drivers, each in its own process ----------------------------------------------------


@pytest.mark.slow
def test_a_second_sweep_run_on_a_running_experiment_is_refused_at_once_naming_the_first(tmp_path):
    spec = write_spec(tmp_path, base=tiny_run(train={"total_steps": 600}), search={"optim.lr": {"grid": [1e-4]}})
    experiment = tmp_path / "runs" / "tiny"
    command = [sys.executable, "-m", "cli", "run", str(spec), "--no-analyze"]
    first = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        deadline = time.time() + 120
        while not (experiment / DRIVER_LOCK_FILE).exists():
            assert first.poll() is None and time.time() < deadline, "the first driver never took the lock"
            time.sleep(0.05)
        second = subprocess.run(
            command + ["--resume"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.splitlines()  # refused before Ray starts: nothing else is said
        first_driver = f"(pid {first.pid} on host {HOST}, "
        assert line.startswith(f"error: {experiment} is driven by another `sweep run` {first_driver}"), line
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert not (experiment / DRIVER_LOCK_FILE).exists()  # given back (its folder removed: nothing to resume)
