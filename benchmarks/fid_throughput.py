"""Inception feature throughput: our in-memory path against `python -m pytorch_fid` on the same
images written as PNGs, the agreement of their statistics, the Fréchet distance by our exact
eigenvalue route against pytorch-fid's `calculate_frechet_distance` (scipy's sqrtm), and
reference statistics cold vs cached.

    python benchmarks/fid_throughput.py [--num-images 200] [--device cpu|cuda] [--weights FILE]
                                        [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance

from diffusion_lib.config import WEIGHTS_ENV, DataConfig
from diffusion_lib.data import load_dataset
from diffusion_lib.metrics.fid import FeatureStats, InceptionFeatures, reference_statistics
from diffusion_lib.metrics.frechet import FrechetReference

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 500 on CUDA, 50 on CPU")
    parser.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV))
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root; default: procedural shapes")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (500 if device.type == "cuda" else 50)
    data_config = DataConfig(name="cifar10", root=args.data_root) if args.data_root else DataConfig(name="shapes")
    data_config.num_images = args.num_images
    images = load_dataset(data_config).images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        folder.mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")

        features = InceptionFeatures(args.weights, device, batch)
        features(images[:batch])  # warm-up: cuDNN autotuning, allocator
        sync(device)
        start = time.perf_counter()
        ours = FeatureStats.from_features(features(images))
        sync(device)
        ours_s = time.perf_counter() - start

        env = dict(os.environ)
        if args.weights:  # let pytorch-fid find the same weights without a download
            hub = tmp / "torch_home" / "hub" / "checkpoints"
            hub.mkdir(parents=True)
            (hub / WEIGHTS_NAME).symlink_to(Path(args.weights).resolve())
            env["TORCH_HOME"] = str(tmp / "torch_home")
        cli = [
            sys.executable,
            "-m",
            "pytorch_fid",
            "--device",
            str(device),
            "--batch-size",
            str(batch),
            "--save-stats",
            str(folder),
            str(tmp / "cli.npz"),
        ]
        start = time.perf_counter()
        subprocess.run(cli, env=env, check=True, capture_output=True)
        cli_s = time.perf_counter() - start
        theirs = FeatureStats.load(tmp / "cli.npz")

        cache = tmp / "cache"
        start = time.perf_counter()
        reference_statistics(load_dataset(data_config), features, None, str(cache))
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        reference_statistics(load_dataset(data_config), features, None, str(cache))
        cached_s = time.perf_counter() - start

    # The Fréchet distance between the two sets of statistics, both ways.
    start = time.perf_counter()
    fast = FrechetReference.from_stats(theirs.mu, theirs.sigma).fid_from_stats(ours.mu, ours.sigma)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = float(calculate_frechet_distance(ours.mu, ours.sigma, theirs.mu, theirs.sigma))
    slow_s = time.perf_counter() - start

    n = len(images)
    print(f"device: {device}, {n} images, batch {batch}, torch {torch.__version__}")
    print(f"in-memory features:        {n / ours_s:8.1f} images/s  ({ours_s:.1f} s)")
    print(f"python -m pytorch_fid:     {n / cli_s:8.1f} images/s  ({cli_s:.1f} s, PNG decode and model load included)")
    print(f"speed-up:                  {cli_s / ours_s:8.2f}x")
    print(
        f"statistics agree:          max|Δμ| = {np.abs(ours.mu - theirs.mu).max():.2e}, "
        f"FID(ours, theirs) = {fast:.2e} (pytorch-fid: {slow:.2e})"
    )
    print(
        f"Fréchet distance:          ours {fast_s:.2f} s (reference's Σ^½ included), pytorch-fid's sqrtm {slow_s:.2f} s"
    )
    print(f"reference statistics:      cold {cold_s:.2f} s, cached {cached_s:.3f} s")


if __name__ == "__main__":
    main()
