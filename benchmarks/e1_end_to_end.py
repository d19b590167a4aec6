"""End-to-end wall time of the research notes' E1 run: 10k steps at batch 4, FID on 2k samples
every 2k steps, final FID on 10k samples (the notes: ≈3,600 s on a cloud GPU). Reference
statistics are computed before the timer starts (cached, as in any second run).

    python benchmarks/e1_end_to_end.py --weights FILE [--data-root ../shared/data] [--compile]
    python benchmarks/e1_end_to_end.py --weights FILE --scale 0.05    # a scaled-down run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from diffusion_lib.build import create_trainer
from diffusion_lib.config import WEIGHTS_ENV, RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV))
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root (default: procedural shapes, same image size)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply steps and sample counts (e.g. 0.05 on a CPU)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="train.compile: true")
    args = parser.parse_args()

    config = RunConfig()
    if args.data_root:
        config.data.root = args.data_root
    else:
        config.data.name, config.data.num_images = "shapes", 10_000
    config.train.device, config.train.compile = args.device, args.compile
    config.fid.weights = args.weights
    config.train.total_steps = max(1, round(10_000 * args.scale))
    config.eval.every = max(1, round(2_000 * args.scale))
    config.fid.num_samples = max(2, round(2_000 * args.scale))
    config.fid.final_num_samples = max(2, round(10_000 * args.scale))
    if args.scale < 1:  # scaled runs also scale the reference set (CIFAR-10 has 50k images)
        config.fid.ref_num_images = max(100, round(50_000 * args.scale))
    with tempfile.TemporaryDirectory() as run_dir:
        config.fid.cache_dir = os.path.join(run_dir, "fid-cache")
        start = time.perf_counter()
        trainer = create_trainer(config, run_dir, progress=False)  # loads data and Inception, computes reference stats
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        summary = trainer.fit()
        total_s = time.perf_counter() - start
    print(
        f"E1 at scale {args.scale:g} on {trainer.device}: {config.train.total_steps} steps, FID "
        f"{config.fid.num_samples} "
        f"samples every {config.eval.every} steps, final FID on {config.fid.final_num_samples}"
    )
    print(f"setup (data, Inception, reference statistics): {setup_s:.1f} s")
    print(f"training + milestones: {total_s:.1f} s; {json.dumps(summary)}")


if __name__ == "__main__":
    main()
