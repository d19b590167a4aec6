"""benchmarks/gpu_check.py, the first GPU session's one prepared check, run at its small size on
the CPU as the GPU machine would run it: without Ray, Optuna or pytorch-fid, from the repository
root. Every section must still be there and pass, so the check cannot rot before a GPU runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

ABSENT_ON_THE_GPU_MACHINE = ("ray", "optuna", "pytorch_fid")
ROWS = (
    "training images/s, batch 4",
    "training images/s, batch 16",
    "bf16 vs fp32 loss, 4 steps",
    "Inception features/s",
    "FID jackknife, CUDA vs CPU",
    "packing 2 batch-4 trials",
    "E1 at scale 0.0004",
    "compiled images/s, batch 4",
    "compiled images/s, batch 16",
    "CUDA tests",
)


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_on_a_cpu_without_ray_optuna_or_pytorch_fid(tmp_path):
    for name in ABSENT_ON_THE_GPU_MACHINE:  # first on the path: importing them fails, here and in every subprocess
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--size", "small"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("section "))
    statuses = {}
    for line in lines[header + 1 : -1]:  # the table's rows, then the total
        section = next(row for row in ROWS if line.startswith(row + "  "))
        statuses[section] = line[len(section) :].split()[0]
    assert list(statuses) == list(ROWS), done.stdout
    assert statuses["CUDA tests"] in ("ok", "skipped")  # skipped: this machine has no CUDA device
    assert all(status == "ok" for section, status in statuses.items() if section != "CUDA tests"), done.stdout
    assert done.stdout.rstrip().endswith("no section failed")
    assert "stand-in with random weights" in done.stdout
