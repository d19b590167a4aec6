"""How the readers' cost grows with the number of trials: `sweep analyze`, `sweep status` and the
experiment loading `sweep run --resume --dry-run` does, on synthetic experiment folders of 10,
100 and 1,000 trials written with the record's own writers (no training): 25 milestones each
(FID ± standard error with its 25 jackknife replicates, KID, curvature, loss by t-bucket), one
trial in ten stopped by the scheduler at an early rung, one in twenty errored. Targets on the
2-core machine at 1,000 trials: analyze ≤ 60 s, status ≤ 3 s (a fresh process, as a user runs it).

    python benchmarks/scale.py [--trials 10 100 1000] [--milestones 25]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffusion_lib.config import RunConfig
from diffusion_lib.milestone import NUM_T_BUCKETS
from diffusion_lib.run_files import METRICS_FILE, metrics_line
from record import states
from record.experiment import load_experiment
from record.files import RAY_ERROR_FILE, Summary, SweepFile, TrialFile, TrialOutcome, trial_label

SEARCH = {"optim.lr": {"loguniform": [1e-5, 1e-2]}, "loss.minsnr_gamma": {"uniform": [1.0, 20.0]}}


def write_experiment(folder: Path, num_trials: int, num_milestones: int, seed: int = 0) -> None:
    """An Optuna-like sweep's folder: FID a noisy bowl in log10(lr), γ a weak effect."""
    rng = np.random.default_rng(seed)
    SweepFile("val/fid", "min", SEARCH).write(str(folder))
    base = RunConfig().with_overrides({"train.total_steps": 1000 * num_milestones, "fid.num_samples": 2000})
    outcomes = {}
    for i in range(num_trials):
        lr, gamma = float(10 ** rng.uniform(-5, -2)), float(rng.uniform(1, 20))
        searched = {"optim.lr": lr, "loss.minsnr_gamma": gamma}
        name = f"{i:05d}_{trial_label(searched)}"
        state = states.ERRORED if i % 20 == 7 else states.STOPPED if i % 10 == 3 else states.FINISHED
        reached = (
            num_milestones
            if state == states.FINISHED
            else max(1, num_milestones // (4 if state == states.STOPPED else 2))
        )
        level = 120 + 40 * (math.log10(lr) + 3.5) ** 2 + 0.3 * gamma
        rows = []
        for m in range(1, reached + 1):
            fid = level + 200 / m + rng.normal(0, 2)
            replicates = (fid + rng.normal(0, 0.4, 25)).tolist()
            rows.append(
                {
                    "step": 1000 * m,
                    "images_seen": 4000 * m,
                    "wall_time_s": 60.0 * m,
                    "train/loss": 0.05 + 0.5 / m,
                    **{f"loss/t_bucket_{b}": 0.05 * (b + 1) / m for b in range(NUM_T_BUCKETS)},
                    "val/fid": fid,
                    "val/fid_stderr": 2.0,
                    "val/fid_jackknife": replicates,
                    "val/fid_num_samples": 2000,
                    "val/fid_ref_num_images": 50000,
                    "val/fid_reference": "cifar10-ref-50000.npz",
                    "val/kid": fid / 1000,
                    "val/kid_stderr": 0.001,
                    "curvature/hutch_trace_mean": 300 - m + rng.normal(0, 5),
                    "curvature/hutch_trace_stderr": 5.0,
                }
            )
        trial_dir = folder / name
        TrialFile(searched, {**base.with_overrides(searched).flat()}, "node-1").write(trial_dir)
        (trial_dir / METRICS_FILE).write_text("".join(metrics_line(r) for r in rows))
        if state == states.ERRORED:
            (trial_dir / RAY_ERROR_FILE).write_text("Traceback …\nNonFiniteLossError: non-finite training loss\n")
        outcomes[name] = TrialOutcome(
            state, "NonFiniteLossError: non-finite training loss" if state == states.ERRORED else None
        )
    Summary(outcomes).write(str(folder))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--milestones", type=int, default=25)
    args = parser.parse_args()
    print(f"{'trials':>7} {'load (s)':>9} {'status (s)':>11} {'analyze (s)':>12} {'report.html (MB)':>17}")
    with tempfile.TemporaryDirectory(prefix="scale-") as scratch:
        for n in args.trials:
            folder = Path(scratch) / f"sweep_{n}"
            write_experiment(folder, n, args.milestones)
            start = time.perf_counter()
            load_experiment(folder)
            load_s = time.perf_counter() - start
            status_s = timed([sys.executable, "-m", "cli", "status", str(folder)])
            analyze_s = timed([sys.executable, "-m", "cli", "analyze", str(folder)])
            html_mb = (folder / "analysis" / "report.html").stat().st_size / 1e6
            print(f"{n:>7} {load_s:>9.2f} {status_s:>11.2f} {analyze_s:>12.1f} {html_mb:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
