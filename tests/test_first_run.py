"""A newcomer's first run: the README's main job as printed, and what is refused before Ray
starts (relative paths and a failed sweep's story: tests/test_sweeps.py, on its module's Ray)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from typer.testing import CliRunner

from cli.main import app
from sweeps.console import RAY_STORAGE_LOGGERS, one_line_console

from conftest import REPO, SHARED, TINY_RUN, needs_fid_weights, write_spec

runner = CliRunner()


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def user_env() -> dict[str, str]:
    """The environment of a fresh shell: no cluster address or FID weights left by a test."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SWEEP_FID_WEIGHTS")}


@pytest.mark.slow
@needs_fid_weights
def test_the_readme_main_job_runs_as_printed(tmp_path):
    """The README's lines, verbatim, in a fresh clone with ../shared beside it; the smoke spec is
    swapped for one of the same shape at a tenth of the size so the test stays short."""
    lines = readme_block("## The main job")
    assert lines[-1] == "sweep run search_spaces/smoke.yaml"
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "search_spaces", clone / "search_spaces")
    shutil.copytree(REPO / "configs", clone / "configs")
    (tmp_path / "shared").symlink_to(SHARED)  # ../shared, as the README's relative path expects
    smoke = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    smoke["base"].update(
        {
            "data": {"name": "shapes", "num_images": 64},
            "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1},
            "train": {"total_steps": 20, "batch_size": 8},
            "ema": {"decay": 0.8},
            "eval": {"every": 10, "nfe": 5, "grid_size": 4, "batch_size": 16},
            "fid": {"num_samples": 8, "final_num_samples": 8, "ref_num_images": 32},
            "curvature": {"probes": 2, "batch_size": 4},
        }
    )
    smoke["scheduler"]["grace_period"] = 10
    (clone / "search_spaces" / "smoke.yaml").write_text(yaml.safe_dump(smoke))

    done = subprocess.run(
        ["bash", "-ec", "\n".join(lines)], cwd=clone, env=user_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = clone / "runs" / "smoke" / "analysis" / "report.md"
    assert f"report: {report}" in done.stdout and report.is_file()
    # The spec runs its better learning rate first, so ASHA has a bar at the first rung to cut the
    # trailing arm against, as the spec says it does. (Whether it also cuts one of the leading pair,
    # a difference within noise, depends on which of the two reports first: ASHA knows no noise.)
    trials = pq.read_table(report.parent / "trials.parquet", columns=["state", "optim.lr", "final.step"]).to_pylist()
    outcomes = {lr: sorted((t["state"], t["final.step"]) for t in trials if t["optim.lr"] == lr) for lr in (1e-3, 1e-4)}
    assert outcomes[1e-4] == [("stopped", 10), ("stopped", 10)], trials
    assert outcomes[1e-3] in ([("finished", 20), ("finished", 20)], [("finished", 20), ("stopped", 10)]), trials
    assert "LinAlgWarning" not in done.stderr and "Token authentication" not in done.stderr
    # One story on a console that is not a terminal: no colour codes, the FID notes once for the
    # sweep (not once per trial), and the product's lines last.
    console = done.stdout + done.stderr
    assert "\x1b[" not in console
    assert console.count("fewer than the 2048 Inception features") == 1
    assert "FID floor: real images (training images outside the reference) score" in done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("TensorBoard: tensorboard --logdir")
    assert "Current best trial" not in console and "Result logdir" not in console


def test_a_missing_weights_file_is_exit_2_naming_the_key_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_FID_WEIGHTS", "nowhere/pt_inception.pth")
    spec = write_spec(
        tmp_path,
        base={**TINY_RUN, "fid": {"num_samples": 8, "final_num_samples": 8}},
        search={"optim.lr": {"grid": [1e-4]}},
    )
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert f"$SWEEP_FID_WEIGHTS: no such file {tmp_path / 'nowhere' / 'pt_inception.pth'}" in result.output
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_dry_run_warns_of_a_gpu_request_on_a_machine_without_one(tmp_path):
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["run", str(REPO / "search_spaces" / "min_snr_gamma.yaml"), "--dry-run"])
    assert result.exit_code == 0 and "warning: resources.gpu" in result.output


def test_an_unwritable_experiment_folder_is_exit_2_before_ray_starts(tmp_path):
    (tmp_path / "taken").write_text("a file where the storage folder should go")
    spec = write_spec(tmp_path, storage=str(tmp_path / "taken" / "runs"), search={"optim.lr": {"grid": [1e-4]}})
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: storage: cannot write to {tmp_path / 'taken' / 'runs'}")
    assert not ray.is_initialized()  # refused before Ray started, so before any trial


@pytest.mark.parametrize("logger_name", RAY_STORAGE_LOGGERS)
def test_a_storage_complaint_of_ray_with_a_traceback_reaches_the_console_as_one_line(logger_name):
    one_line_console()
    one_line_console()  # a second sweep in the process adds nothing
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        try:
            raise OSError("When uploading part for key 'x': AWS Error NETWORK_CONNECTION\nTimeout was reached")
        except OSError:
            logger.error("Saving experiment state to storage at 'bucket/x' failed with exception: ", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert console.getvalue() == (
        "Saving experiment state to storage at 'bucket/x' failed with exception: OSError: When uploading part for "
        "key 'x': AWS Error NETWORK_CONNECTION\n"
    )


def test_a_full_disk_is_exit_2_before_ray_starts(tmp_path):
    """A 64 KiB filesystem (tmpfs), filled: an empty file can still be made there, a checkpoint not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        with open(disk / "filler", "wb") as filler, contextlib.suppress(OSError):
            filler.write(bytes(1 << 20))
        spec = write_spec(tmp_path, storage=str(disk / "runs"), search={"optim.lr": {"grid": [1e-4]}})
        result = CliRunner().invoke(app, ["run", str(spec)])
        assert result.exit_code == 2, result.output
        (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert error == f"error: storage: cannot write to {disk / 'runs'}: No space left on device"
        assert not ray.is_initialized() and sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing left
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_missing_data_folder_is_exit_2_and_leaves_no_experiment_folder(tmp_path):
    spec = write_spec(
        tmp_path,
        base={**TINY_RUN, "data": {"name": "cifar10", "root": str(tmp_path / "no_data"), "download": False}},
        search={"optim.lr": {"grid": [1e-4]}},
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "data.root=" in result.output, result.output
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()
