"""The FID jackknife on a torch device: `fid_jackknife` (torch.linalg, float64) on the CPU and,
where there is one, on CUDA, against the numpy route it replaced (kept below as the reference
implementation: every replicate's FID from scratch, one numpy eigenvalue problem each), at a
milestone's sample count (N = 2,000 generated samples, G = 25 groups) against a reference of
1,085 real images. Prints the time of each route and how far its replicates and standard error are from
the reference implementation's (they must agree to 1e-9, relative).

Features: the real Inception pool3 features of CIFAR-10 images when the file is there (reference:
the first images; generated: the next N), else Gaussian features of the same shape. The CUDA time
includes moving the features to the GPU, as at a milestone (the trainer hands over host arrays).

    python benchmarks/jackknife_device.py [--features ../shared/data/inception_pool3_train_subset.npy]
                                          [--reference-images 1085] [--num-samples 2000] [--groups 25]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_lib.jackknife import replicate_stderr
from diffusion_lib.metrics.frechet import FrechetReference, fid_jackknife

SHARED = Path(os.environ.get("SWEEP_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
TOLERANCE = 1e-9  # relative


def numpy_jackknife(reference: FrechetReference, features: np.ndarray, num_groups: int, seed: int) -> np.ndarray:
    """The replicates as the numpy route computed them: for each group, the FID of the samples
    without it, from their own mean, covariance trace and Gram (or D×D) eigenvalues, those within
    numpy.linalg.matrix_rank's threshold of zero taken as zero."""
    n = features.shape[0]
    d = n // num_groups
    transformed = features @ reference.sqrt_sigma
    order = np.random.default_rng(seed).permutation(n)
    replicates = []
    for group in order[: d * num_groups].reshape(num_groups, d):
        keep = np.ones(n, dtype=bool)
        keep[group] = False
        kept, m = features[keep], n - d
        mu = kept.mean(axis=0)
        trace_sigma = np.sum((kept - mu) ** 2) / (m - 1)
        y = transformed[keep] - transformed[keep].mean(axis=0)
        eigenvalues = np.linalg.eigvalsh((y @ y.T if m < y.shape[1] else y.T @ y) / (m - 1))
        threshold = eigenvalues.max(initial=0.0) * eigenvalues.size * np.finfo(np.float64).eps
        trace_sqrt = np.sum(np.sqrt(np.where(eigenvalues > threshold, eigenvalues, 0.0)))
        replicates.append(np.sum((reference.mu - mu) ** 2) + np.trace(reference.sigma) + trace_sigma - 2 * trace_sqrt)
    return np.asarray(replicates)


def load_features(path: Path, num_rows: int) -> tuple[np.ndarray, str]:
    if path.is_file():
        features = np.load(path).astype(np.float64)
        if features.shape[0] < num_rows:
            sys.exit(f"{path} has {features.shape[0]} rows; the benchmark needs {num_rows}")
        return features[:num_rows], f"real Inception pool3 features ({path})"
    return synthetic_features(num_rows), f"synthetic Gaussian features ({path} is absent)"


def synthetic_features(num_rows: int, dims: int = 2048) -> np.ndarray:
    """Gaussian features with a decaying spectrum, like pool3's: isotropic features would make
    every eigenvalue alike."""
    rng = np.random.default_rng(0)
    scales = 1 / np.sqrt(1 + np.arange(dims))
    return rng.normal(size=(num_rows, dims)) * scales + 0.5


def time_route(
    reference: FrechetReference,
    generated: np.ndarray,
    groups: int,
    seed: int,
    device: torch.device,
    expected: np.ndarray,
    expected_stderr: float,
) -> tuple[float, float, float]:
    """`fid_jackknife` on `device` after a warm-up: its seconds, and the largest relative
    differences of its replicates and of its standard error from the reference implementation's."""
    fid_jackknife(reference, generated[:100], num_groups=groups, device=device)  # warm-up: solver handles
    sync(device)
    start = time.perf_counter()
    jackknife = fid_jackknife(reference, generated, num_groups=groups, seed=seed, device=device)
    sync(device)
    seconds = time.perf_counter() - start
    replicates_rel = np.max(np.abs(jackknife.replicates - expected) / np.abs(expected))
    return seconds, replicates_rel, abs(jackknife.stderr - expected_stderr) / expected_stderr


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, default=SHARED / "data" / "inception_pool3_train_subset.npy")
    parser.add_argument("--reference-images", type=int, default=1085)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    features, source = load_features(args.features, args.reference_images + args.num_samples)
    reference = FrechetReference.from_features(features[: args.reference_images])
    generated = features[args.reference_images :]

    start = time.perf_counter()
    expected = numpy_jackknife(reference, generated, args.groups, args.seed)
    numpy_s = time.perf_counter() - start
    expected_stderr = replicate_stderr(expected, len(generated))

    default_threads = torch.get_num_threads()
    print(f"{source}: reference of {args.reference_images} images, N = {len(generated)} generated, G = {args.groups}")
    print(
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"torch {torch.__version__} ({default_threads} intra-op threads by default), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"numpy route (reference):     {numpy_s:6.1f} s  FID stderr {expected_stderr:.6f}")
    # The CPU at one thread (a Ray trial with resources.cpu = 1: Ray sets OMP_NUM_THREADS to a worker's
    # CPUs) and at torch's default count.
    runs = [("cpu", threads) for threads in sorted({1, default_threads})]
    runs += [("cuda", default_threads)] if torch.cuda.is_available() else []
    worst = 0.0
    for device_type, threads in runs:
        device = torch.device(device_type)
        torch.set_num_threads(threads)
        seconds, replicates_rel, stderr_rel = time_route(
            reference, generated, args.groups, args.seed, device, expected, expected_stderr
        )
        worst = max(worst, replicates_rel, stderr_rel)
        label = "torch on cuda:" if device_type == "cuda" else f"torch on cpu, {threads} thread{'s' * (threads > 1)}:"
        print(
            f"{label:<28} {seconds:6.1f} s  ({numpy_s / seconds:.1f}x)  "
            f"max relative difference: replicates {replicates_rel:.1e}, stderr {stderr_rel:.1e}"
        )
    if not torch.cuda.is_available():
        print("torch on cuda:                no CUDA device here")
    verdict = "ok" if worst <= TOLERANCE else "FAILED"
    print(f"agreement: {verdict} (largest relative difference {worst:.1e}, tolerance {TOLERANCE:.0e})")
    if worst > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
