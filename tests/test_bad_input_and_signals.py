"""Nothing lost, nothing false: an experiment name that would leave the storage, numbers YAML 1.1
reads as strings, FID of a single image, a dry run of a huge grid, and SIGTERM's handler — each
as the `sweep` command meets it (SIGTERM ending a real sweep, and the interruption note after its
resume: tests/test_resume_faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from diffusion_lib.config import ConfigError, load_yaml
from sweeps.spec import load_spec

from conftest import TINY_RUN, write_spec


def sweep(*args: str, cwd, **options) -> subprocess.CompletedProcess:
    """The `sweep` command in its own process, with this machine's environment less any Ray address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True, **options
    )


@pytest.mark.parametrize(
    "in_spec, options", [({"name": "../../escape"}, []), ({}, ["--name", "../../escape"])], ids=["spec", "--name"]
)
def test_a_name_that_leaves_the_storage_exits_2_and_writes_nothing(tmp_path, in_spec, options):
    """`../../escape` put the product's files two levels above the storage and Ray's trials at the
    filesystem root, and exited 0."""
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    spec = write_spec(folder, search={"optim.lr": {"grid": [1e-4]}}, **in_spec)
    refused = sweep("run", str(spec), *options, cwd=folder)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        "error: name: '../../escape' is not an experiment name; "
        "use up to 128 letters, digits, '.', '_' and '-', starting with a letter or digit"
    ]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/spec.yaml"]
    for name in ("a/b", ".hidden", "..", "-x", "two words", "x" * 129):  # a 300-character name: OSError mid-sweep
        with pytest.raises(ConfigError, match="is not an experiment name"):
            load_spec(spec, name=name)
    assert load_spec(spec, name="E1.v2_min-snr").name == "E1.v2_min-snr"
    assert load_spec(spec, name="x" * 128).name == "x" * 128


def test_numbers_with_an_exponent_but_no_dot_are_numbers_in_specs_and_set(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string: `--set optim.lr=1e-4` was "expected a number"."""
    assert [load_yaml(text) for text in ("1e-4", "1E5", "-2.5e-3", ".5e3", "1e3", "128", "1.0e-4", "1e", "v1e3")] == [
        1e-4,
        1e5,
        -2.5e-3,
        500.0,
        1000.0,
        128,
        1e-4,
        "1e",
        "v1e3",
    ]
    assert isinstance(load_yaml("128"), int)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"base": TINY_RUN, "metric": "train/loss", "storage": str(tmp_path / "runs"), "name": "tiny"})
        + "search:\n  optim.lr: {grid: [1e-05, 2e-4]}\n"  # as typed: yaml.safe_dump would write 1.0e-05
    )
    described = sweep("run", str(spec), "--set", "ema.decay=5e-1", "--dry-run", cwd=tmp_path)
    assert described.returncode == 0, described.stderr
    assert "    1  lr=1e-05" in described.stdout and "    2  lr=0.0002" in described.stdout
    loaded = load_spec(spec, ["ema.decay=5e-1", "train.total_steps=1e2"])
    assert (loaded.run_config.ema.decay, loaded.run_config.train.total_steps) == (0.5, 100)


@pytest.mark.parametrize("command", ["fid", "fid-stats"])
def test_fid_of_a_single_image_is_one_line_exit_2_before_inception_loads(tmp_path, command):
    """It was a 46-line traceback: FID needs a covariance, so two images at least. The weights
    named do not exist: a refusal about them would mean Inception was loaded first."""
    one, three = tmp_path / "one", tmp_path / "three"
    for folder, count in ((one, 1), (three, 3)):
        folder.mkdir()
        for i in range(count):
            Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(folder / f"{i}.png")
    sources = [str(three), str(one)] if command == "fid" else [str(one), "--out", str(tmp_path / "one.npz")]
    result = CliRunner().invoke(app, [command, *sources, "--weights", str(tmp_path / "missing.pth")])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: {one}: 1 image file (.bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp); "
        "FID needs at least 2 images, for their covariance"
    ]
    assert not (tmp_path / "one.npz").exists()


def test_a_dry_run_of_a_100000_trial_grid_prints_a_summary(tmp_path):
    """It printed 100,005 lines, in 67 s and 663 MB. The grid keys are written in sorted order
    (write_spec's yaml.safe_dump sorts them), the first varying fastest, as Ray Tune numbers them."""
    grid = {
        "eval.grid_size": list(range(1, 11)),
        "model.base_channels": list(range(8, 88, 8)),
        "train.batch_size": list(range(1, 11)),
        "train.seed": list(range(10)),
        "train.total_steps": list(range(10, 110, 10)),
    }
    spec = write_spec(tmp_path, search={key: {"grid": values} for key, values in grid.items()})
    described = sweep("run", str(spec), "--dry-run", cwd=tmp_path, timeout=120)
    assert described.returncode == 0, described.stderr
    lines = described.stdout.splitlines()

    def label(*positions: int) -> str:
        return ",".join(f"{key.split('.')[-1]}={grid[key][p]}" for key, p in zip(grid, positions))

    trials = [line.split() for line in lines if line.startswith("  ")]
    assert len(lines) < 30 and lines[-1] == "100000 trials"
    assert trials[0] == ["1", label(0, 0, 0, 0, 0)] and trials[9] == ["10", label(9, 0, 0, 0, 0)]
    assert trials[10] == ["…", "99,980", "trials", "not", "listed"]
    assert trials[11] == ["99991", label(0, 9, 9, 9, 9)] and trials[-1] == ["100000", label(9, 9, 9, 9, 9)]
    others = 100_000 // 100  # the combinations of the three keys that leave the cost alone
    steps = sum(grid["train.total_steps"]) * len(grid["train.batch_size"]) * others
    images = sum(grid["train.total_steps"]) * sum(grid["train.batch_size"]) * others
    assert f"cost without early stopping: {steps:,} training steps ({images:,} images)" in described.stdout


def test_a_small_grid_lists_every_trial_and_a_grid_combining_an_impossible_pair_is_refused(tmp_path):
    """The dry run's cost no longer builds every trial's config, which had also caught a grid
    combining values each valid alone: the spec checks the combinations of the keys checked together."""
    small = write_spec(tmp_path, search={"train.seed": {"grid": list(range(40))}})
    described = CliRunner().invoke(app, ["run", str(small), "--dry-run"])
    numbered = [int(line.split()[0]) for line in described.output.splitlines() if line.startswith("  ")]
    assert described.exit_code == 0 and numbered == list(range(1, 41)), described.output
    impossible = write_spec(
        tmp_path, search={"eval.nfe": {"grid": [5, 50]}, "diffusion.num_timesteps": {"grid": [10, 100]}}
    )
    refused = CliRunner().invoke(app, ["run", str(impossible), "--dry-run"])
    assert refused.exit_code == 2 and "search: the grid combines num_timesteps=10,nfe=50: eval.nfe" in refused.output


def test_sigterm_outside_tune_raises_keyboard_interrupt_and_survives_ray_init():
    """Before the trials (the data, Ray, the FID reference pass) SIGTERM takes Ctrl-C's path: a
    KeyboardInterrupt, then exit 143. `ray.init` replaces the SIGTERM handler with one that exits
    at once (and a native one that dumps a stack): ours is put back."""
    from sweeps.interrupt import CtrlC, ray_init_keeps_stop_handlers

    before = signal.getsignal(signal.SIGTERM)
    with CtrlC(tune=False) as stop:
        with ray_init_keeps_stop_handlers():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts this at once
    assert stop.pressed and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_ctrl_c_whose_keyboard_interrupt_was_swallowed_still_ends_the_sweep_before_any_trial(tmp_path, monkeypatch):
    """Python runs a signal's handler wherever it is, e.g. inside logging's at-fork handler while
    Ray starts its processes, which prints "Exception ignored" and drops the KeyboardInterrupt:
    the sweep then ran to its end and exited 0. The handler's note of the signal still stops it."""
    from sweeps import runner

    real_load_dataset = runner.load_dataset

    def load_dataset_swallowing_a_ctrl_c(config):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler interrupts this at once
        except KeyboardInterrupt:
            pass  # what an at-fork handler's "Exception ignored" does
        return real_load_dataset(config)

    monkeypatch.setattr(runner, "load_dataset", load_dataset_swallowing_a_ctrl_c)
    for name in ("start_ray", "check_resources"):
        monkeypatch.setattr(runner, name, lambda *args: None)
    monkeypatch.setattr(runner, "ray_cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runner, "describe_cluster", lambda cluster: "Ray (stand-in)")
    spec = load_spec(write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}))
    with pytest.raises(runner.SweepInterrupted, match="interrupted before any trial started") as stopped:
        runner.drive_sweep(spec)
    assert stopped.value.exit_code == 130


def test_a_stop_signal_that_ended_the_local_ray_ends_the_sweep_with_its_workers_killed(tmp_path):
    """Stand-ins: a `raylet` child (a copy of sleep under that name), a worker it started (its
    environment names it) and another process. The end comes only after a stop signal and the
    raylet's death, and only when Tune has not returned within the grace; then the raylet's
    worker is killed and no other process. tests/test_resume_faults.py's SIGTERM case is the real one."""
    import shutil
    import threading

    from sweeps.interrupt import CtrlC
    from sweeps.local_ray import RAYLET_ENV, EndWhenLocalRayDies

    shutil.copy(shutil.which("sleep"), tmp_path / "raylet")
    raylet = subprocess.Popen([str(tmp_path / "raylet"), "60"])
    worker = subprocess.Popen(["sleep", "60"], env={**os.environ, RAYLET_ENV: str(raylet.pid)})
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        ctrl_c, ended = CtrlC(), threading.Event()
        with EndWhenLocalRayDies(ctrl_c, ended.set, grace_s=0.3, poll_s=0.05):
            raylet.terminate()
            time.sleep(0.5)
            assert not ended.is_set()  # a raylet that died without a stop signal is Ray's affair
        ctrl_c.received = signal.SIGTERM
        with EndWhenLocalRayDies(ctrl_c, ended.set, grace_s=5.0, poll_s=0.05):
            time.sleep(0.5)  # Tune returned within the grace
        assert not ended.is_set() and worker.poll() is None
        with EndWhenLocalRayDies(ctrl_c, ended.set, grace_s=0.3, poll_s=0.05):
            assert ended.wait(10)
        assert worker.wait(10) == -signal.SIGKILL and bystander.poll() is None
    finally:
        for process in (raylet, worker, bystander):
            process.kill()
            process.wait()
