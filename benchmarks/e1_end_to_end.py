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
from dataclasses import dataclass
from typing import Any, Optional

from diffusion_lib.build import create_trainer
from diffusion_lib.config import WEIGHTS_ENV, RunConfig
from diffusion_lib.metrics.fid import FeatureExtractor

E1_NOTES_S = 3_600  # the notes' wall time of E1 (≈ 3,590 s, one GPU on Colab)
E1_STEPS = 10_000


def e1_config(
    scale: float = 1.0,
    data_root: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
    weights: Optional[str] = None,
) -> RunConfig:
    """E1 (the schema's defaults) with its steps and sample counts multiplied by `scale`."""
    config = RunConfig()
    if data_root:
        config.data.root = data_root
    else:
        config.data.name, config.data.num_images = "shapes", 10_000
    config.train.device, config.train.compile = device, compile
    config.fid.weights = weights
    config.train.total_steps = max(1, round(E1_STEPS * scale))
    config.eval.every = max(1, round(2_000 * scale))
    config.fid.num_samples = max(2, round(2_000 * scale))
    config.fid.final_num_samples = max(2, round(10_000 * scale))
    if scale < 1:  # scaled runs also scale the reference set (CIFAR-10 has 50k images)
        config.fid.ref_num_images = max(100, round(50_000 * scale))
    return config


@dataclass
class E1Timing:
    device: str
    setup_s: float  # data, Inception, reference statistics
    total_s: float  # training and milestones
    milestone_s: float  # of which in `Trainer.milestone`: samples, grid, FID, KID, curvature (not checkpoints)
    summary: dict[str, Any]


def run_e1(config: RunConfig, features: Optional[FeatureExtractor] = None) -> E1Timing:
    """Train `config` end to end in a temporary folder; reference statistics are computed before
    the timer starts (cached, as in any second run)."""
    with tempfile.TemporaryDirectory() as run_dir:
        config.fid.cache_dir = os.path.join(run_dir, "fid-cache")
        start = time.perf_counter()
        trainer = create_trainer(config, run_dir, features=features, progress=False)
        setup_s = time.perf_counter() - start
        milestone_s = 0.0
        milestone = trainer.milestone

        def timed_milestone(final: bool):
            nonlocal milestone_s
            begin = time.perf_counter()
            try:
                return milestone(final)
            finally:
                milestone_s += time.perf_counter() - begin

        trainer.milestone = timed_milestone
        start = time.perf_counter()
        summary = trainer.fit()
        total_s = time.perf_counter() - start
    return E1Timing(str(trainer.device), setup_s, total_s, milestone_s, summary)


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
    config = e1_config(args.scale, args.data_root, args.device, args.compile, args.weights)
    timing = run_e1(config)
    print(
        f"E1 at scale {args.scale:g} on {timing.device}: {config.train.total_steps} steps, FID "
        f"{config.fid.num_samples} "
        f"samples every {config.eval.every} steps, final FID on {config.fid.final_num_samples}"
    )
    print(f"setup (data, Inception, reference statistics): {timing.setup_s:.1f} s")
    print(
        f"training + milestones: {timing.total_s:.1f} s (milestones {timing.milestone_s:.1f} s); "
        f"{json.dumps(timing.summary)}"
    )


if __name__ == "__main__":
    main()
