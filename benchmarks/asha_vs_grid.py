"""Does early stopping pay here? The same small search run as a full grid and with ASHA, in one
process: total trial-steps, wall time and the best same-count FID (± its standard error) of each.

ASHA's promise is to find the grid's best for less compute; a well-tuned ASHA should reach the
grid's best within noise using ≤ 40% of its trial-steps. If it does not on this search, the
printout says which: rung placement (the winner trailed at a rung) or noise at the rung.

    python benchmarks/asha_vs_grid.py --weights FILE [--steps 120] [--every 20]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import yaml

from analysis.experiment import load_experiment
from diffusion_lib.config import WEIGHTS_ENV
from diffusion_lib.milestone import FID, FID_STDERR, STEP
from sweeps.runner import run_sweep
from sweeps.spec import load_spec


def spec_file(folder: Path, name: str, steps: int, every: int, scheduler: dict, weights: str) -> Path:
    spec = {
        "name": name,
        "storage": str(folder),
        "base": {
            "data": {"name": "shapes", "num_images": 512},
            "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1},
            "train": {"total_steps": steps, "batch_size": 16},
            "ema": {"decay": 0.8},
            "eval": {"every": every, "nfe": 10, "grid_size": 4, "batch_size": 64},
            "fid": {"num_samples": 64, "final_num_samples": 0, "ref_num_images": 256, "weights": weights},
            "curvature": {"probes": 0},
        },
        "search": {"optim.lr": {"grid": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}, "loss": {"grid": [{"weighting": "constant"}, {"weighting": "min_snr", "minsnr_gamma": 5}]}},
        "algorithm": "grid",
        "scheduler": scheduler,
        "metric": "val/best_fid",
        "mode": "min",
        "resources": {"cpu": 1},
        "max_concurrent": 2,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def summarise(experiment_dir: Path) -> tuple[int, float, float, str]:
    """Trial-steps, best same-count FID, its standard error and the winner's label."""
    experiment = load_experiment(experiment_dir)
    steps = sum(t.milestones[-1][STEP.name] for t in experiment.trials if t.milestones)
    best = min(((t, t.best_milestone(FID.name, "min")) for t in experiment.trials), key=lambda tb: tb[1][FID.name] if tb[1] else math.inf)
    return steps, best[1][FID.name], best[1].get(FID_STDERR.name, math.nan), best[0].label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="asha-vs-grid-"))
    rows = []
    for name, scheduler in [("grid", "none"), ("asha", {"type": "asha", "grace_period": args.every, "reduction_factor": 3})]:
        spec = load_spec(spec_file(folder, name, args.steps, args.every, scheduler, args.weights))
        start = time.perf_counter()
        run_sweep(spec)
        rows.append((name, time.perf_counter() - start, *summarise(Path(spec.experiment_path))))
    print(f"{'search':<8}{'wall s':>9}{'trial-steps':>13}{'best FID':>10}{'± se':>8}  winner")
    for name, wall, steps, fid, se, label in rows:
        print(f"{name:<8}{wall:>9.1f}{steps:>13}{fid:>10.2f}{se:>8.2f}  {label}")
    (_, grid_wall, grid_steps, grid_fid, grid_se, _), (_, asha_wall, asha_steps, asha_fid, asha_se, _) = rows
    gap, noise = asha_fid - grid_fid, 2 * math.hypot(grid_se, asha_se)
    print(f"ASHA used {asha_steps / grid_steps:.0%} of the grid's trial-steps and {asha_wall / grid_wall:.0%} of its wall time; "
          f"its best is {gap:+.2f} from the grid's ({'within' if abs(gap) <= noise else 'outside'} two combined standard errors, {noise:.2f})")


if __name__ == "__main__":
    main()
