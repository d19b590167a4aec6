"""A sweep's overhead against its trials' own work, phase by phase.

Runs `sweep run` in a subprocess, timestamps the lines it prints, and reads the trials'
`wall_time_s` (training and milestone work) from the experiment's files. It prints:

- wall: the sweep's wall time, from the command's start to its exit;
- work: the trials' training-and-milestone seconds summed, divided by the concurrency;
- overhead factor: wall / work (1.0: the sweep costs exactly its trials' work);
- the phases: before the trials (imports, Ray, the FID reference and floor) up to the
  "starting N trials" line, the trials up to the "analysing" line, then the analysis;
- per-trial overhead: the trials phase's CPU-slots not spent in a trial's own work, per trial
  (a worker's start-up, data, Inception and reference loading, scheduling, checkpoints).

Each spec runs twice: a machine's first sweep (an empty FID reference cache, as a newcomer's),
then a second sweep on the same data.

    export SWEEP_FID_WEIGHTS=../shared/fid/pt_inception-2015-12-05-6726825d.pth
    python benchmarks/sweep_overhead.py                 # the README's main job (smoke.yaml)
    python benchmarks/sweep_overhead.py --many-cut      # 20 shapes trials, ASHA cutting most at 20 steps
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffusion_lib.milestone import WALL_TIME
from record.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"


def many_cut_spec(folder: Path) -> Path:
    """The smoke spec with 20 learning rates, a milestone every 20 steps and ASHA keeping a quarter
    at each rung: most trials end at their first milestone, so a trial's start-up is paid often
    for little work."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(
        name="many_cut",
        # Spelled out, so that the code before and after a change runs the same sweep.
        overrides={"eval.every": 20, "fid.num_samples": 24, "fid.final_num_samples": 32, "fid.ref_num_images": 64},
        search={"optim.lr": {"loguniform": [1.0e-5, 1.0e-2]}},
        algorithm="random",
        num_samples=20,
        scheduler={"type": "asha", "grace_period": 20, "reduction_factor": 4},
    )
    path = folder / "many_cut.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass(frozen=True)
class SweepTimes:
    wall: float
    before_trials: float  # to the "starting N trials" line
    analysis: float  # from the "analysing" line to the exit
    trial_seconds: tuple[float, ...]  # each trial's wall_time_s: its own training and milestone work
    concurrency: int

    @property
    def trials(self) -> float:
        return self.wall - self.before_trials - self.analysis

    @property
    def work(self) -> float:
        return sum(self.trial_seconds) / self.concurrency

    @property
    def per_trial_overhead(self) -> float:
        return (self.trials * self.concurrency - sum(self.trial_seconds)) / len(self.trial_seconds)


def time_sweep(spec: Path, storage: Path, env: dict[str, str]) -> SweepTimes:
    """Run `sweep run SPEC` on `storage`, echoing its lines, and time its phases."""
    raw = yaml.safe_load(spec.read_text())
    command = [sys.executable, "-m", "cli", "run", str(spec), "--storage", str(storage)]
    wall, markers = run_timed(command, env)
    experiment = load_experiment(storage / raw["name"])
    return SweepTimes(
        wall=wall,
        before_trials=markers["starting"],
        analysis=wall - markers["analysing"],
        trial_seconds=tuple(t.milestones[-1][WALL_TIME.name] for t in experiment.trials if t.milestones),
        concurrency=raw["max_concurrent"],
    )


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """The command's wall time and, for each marker, the seconds from its start to the first line
    (stdout or stderr) starting with it; every line is echoed as it comes."""
    markers = {"starting": None, "analysing": None}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def watch(stream, echo) -> None:
        for line in stream:
            echo.write(line)
            for marker, seen in markers.items():
                if seen is None and line.startswith(marker):
                    markers[marker] = time.perf_counter() - start

    readers = [
        threading.Thread(target=watch, args=(process.stdout, sys.stdout)),
        threading.Thread(target=watch, args=(process.stderr, sys.stderr)),
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} exited {process.returncode}")
    return time.perf_counter() - start, markers


def render(spec: Path, runs: list[tuple[str, SweepTimes]]) -> str:
    first = runs[0][1]
    rows = [
        ("", *(label for label, _ in runs)),
        ("wall", *(f"{t.wall:.1f} s" for _, t in runs)),
        ("work (Σ wall_time_s / concurrency)", *(f"{t.work:.1f} s" for _, t in runs)),
        ("overhead factor (wall / work)", *(f"{t.wall / t.work:.2f}" for _, t in runs)),
        ("before the trials", *(f"{t.before_trials:.1f} s" for _, t in runs)),
        ("trials", *(f"{t.trials:.1f} s" for _, t in runs)),
        ("per-trial overhead in the trials phase", *(f"{t.per_trial_overhead:.1f} s" for _, t in runs)),
        ("analysis", *(f"{t.analysis:.1f} s" for _, t in runs)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    title = f"{spec.name}: {len(first.trial_seconds)} trials, {first.concurrency} at a time"
    return "\n".join([title, *("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--many-cut", action="store_true", help="the 20-trial sweep ASHA cuts early, not smoke.yaml")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as scratch:
        scratch = Path(scratch)
        spec = many_cut_spec(scratch) if args.many_cut else SMOKE
        # A machine's first sweep (an empty FID cache, as a newcomer's), then a second on the same data.
        # (matplotlib's font cache stays where it is: rebuilding it is no part of a sweep).
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        env = {"MPLCONFIGDIR": str(user_cache / "matplotlib"), **os.environ, "XDG_CACHE_HOME": str(scratch / "cache")}
        runs = [
            ("first sweep", time_sweep(spec, scratch / "first", env)),
            ("second sweep", time_sweep(spec, scratch / "second", env)),
        ]
    print(render(spec, runs))


if __name__ == "__main__":
    main()
