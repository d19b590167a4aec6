"""Does early stopping keep the best configuration of a real grid, and what does it save?

Runs (or resumes, or reuses) the full grid of one of two real-data specs, then replays its
recorded FID curves under every scheduler in many arrival orders (`sweeps.replay`): Ray's ASHA,
the racing scheduler (sampling noise only), and racing_dynamics (sampling and training
dynamics) with 2, 3 and 4 pilot trials past a rung before it cuts, and racing_dynamics told
the whole grid's term from the start (no pilots: what they cost). For each: how often the
survivors held the grid's best within noise, and the mean share of the grid's trial-steps.

- `--grid crossing`: search_spaces/cpu_crossing_curves.yaml, the Min-SNR study drawn again with a
  milestone every 150 steps over 600, where the arms' curves cross (about 45 min on 2 cores);
- `--grid lr`: search_spaces/cpu_early_stopping.yaml, learning rates 3e-5 … 3e-3 × constant /
  Min-SNR-5 weighting, where bad arms are bad early (about an hour).

Target for racing_dynamics: the best kept in ≥ 95% of orders on both grids, ≤ 80% of the
trial-steps on the lr grid.

    export SWEEP_FID_WEIGHTS=../shared/fid/pt_inception-2015-12-05-6726825d.pth
    python benchmarks/early_stopping.py --grid crossing --data ../shared/data
    python benchmarks/early_stopping.py --grid lr --experiment runs/cpu_early_stopping   # replay a grid already run
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from sweeps.replay import render, replay_experiment

REPO = Path(__file__).resolve().parents[1]
GRIDS = {"crossing": "cpu_crossing_curves", "lr": "cpu_early_stopping"}
PILOTS = (2, 3, 4)  # trials past a rung before racing_dynamics cuts there: the choices compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), required=True)
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"), help="data.root holding cifar-10-batches-py"
    )
    parser.add_argument("--storage", default="runs", help="where the grid's experiment folder is made")
    parser.add_argument("--experiment", help="a finished grid of that spec to replay instead of running one")
    parser.add_argument("--orders", type=int, default=500, help="random arrival orders per scheduler")
    args = parser.parse_args()

    name = GRIDS[args.grid]
    experiment = Path(args.experiment) if args.experiment else Path(args.storage) / name
    if not args.experiment:
        start = time.perf_counter()
        spec = REPO / "search_spaces" / f"{name}.yaml"
        run = ["sweep", "run", str(spec), "--storage", args.storage, "--set", f"data.root={args.data}", "--no-analyze"]
        subprocess.run(run + (["--resume"] if experiment.exists() else []), check=True)
        print(f"grid: {time.perf_counter() - start:.0f} s of wall time")
    # The rungs are ASHA's: every milestone from the first, halving the field.
    info = replay_experiment(
        experiment,
        grace_period=None,
        reduction_factor=2,
        z=2.5,
        concurrency=2,
        orders=args.orders,
        seed=0,
        pilots=PILOTS,
    )
    print("\n".join(render(info)))


if __name__ == "__main__":
    main()
