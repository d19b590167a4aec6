"""Does early stopping keep the best configuration of a real first sweep, and what does it save?

Runs (or reuses) the full grid of `search_spaces/cpu_early_stopping.yaml` on the real CIFAR-10
subset — learning rates 3e-5 … 3e-3 × constant / Min-SNR-5 weighting, FID ± standard error at
every milestone — then replays it under ASHA and the racing scheduler in many arrival orders
(`sweep replay`): how often each one's survivors held the grid's best within noise, and its mean
share of the grid's trial-steps. Target for racing: the best kept in ≥ 95% of orders with
≤ 70% of the trial-steps; ASHA's figures are printed beside it, whatever they are.

    export SWEEP_FID_WEIGHTS=../shared/fid/pt_inception-2015-12-05-6726825d.pth
    python benchmarks/early_stopping.py --data ../shared/data            # about an hour on 2 CPU cores
    python benchmarks/early_stopping.py --experiment runs/cpu_early_stopping   # replay a grid already run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "search_spaces" / "cpu_early_stopping.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"), help="data.root holding cifar-10-batches-py"
    )
    parser.add_argument("--storage", default="runs", help="where the grid's experiment folder is made")
    parser.add_argument("--experiment", help="a finished cpu_early_stopping grid to replay instead of running one")
    parser.add_argument("--orders", type=int, default=500, help="random arrival orders per scheduler")
    args = parser.parse_args()

    experiment = Path(args.experiment) if args.experiment else Path(args.storage) / "cpu_early_stopping"
    if not args.experiment:
        start = time.perf_counter()
        run = ["sweep", "run", str(SPEC), "--storage", args.storage, "--set", f"data.root={args.data}", "--no-analyze"]
        if experiment.exists():
            run.append("--resume")
        subprocess.run(run, check=True)
        print(f"grid: {time.perf_counter() - start:.0f} s of wall time")
    # The racing scheduler's rungs are ASHA's: every milestone from the first, halving the field.
    replay = [
        "sweep",
        "replay",
        str(experiment),
        "--orders",
        str(args.orders),
        "--reduction-factor",
        "2",
        "--concurrency",
        "2",
    ]
    sys.exit(subprocess.run(replay).returncode)


if __name__ == "__main__":
    main()
