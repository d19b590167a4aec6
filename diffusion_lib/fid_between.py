"""`sweep fid A B` and `sweep fid-stats`: FID and Inception statistics of images on disk, as
`python -m pytorch_fid` computes them (the same number, by the exact symmetric-eigenvalue route
instead of scipy's general matrix square root), plus the FID's jackknife standard error over
B's images when B is a folder (statistics files hold no images)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .build import resolve_device
from .config import fid_weights
from .metrics.fid import (
    FEATURE_DIMS,
    FID_JACKKNIFE_GROUPS,
    FeatureStats,
    InceptionFeatures,
    features_of_images,
    read_source,
    small_sample_note,
)
from .metrics.frechet import FrechetReference, fid_jackknife


def inception_features(weights: Optional[str], device: str, batch_size: int, *, progress: bool) -> InceptionFeatures:
    """pytorch-fid's Inception network from `--weights` (else $SWEEP_FID_WEIGHTS, else a download)."""
    return InceptionFeatures(fid_weights(weights)[0], resolve_device(device), batch_size, progress=progress)


@dataclass(frozen=True)
class FidBetween:
    line: str  # `FID: 12.3 ± 0.4 (N images of B against M images of A)`
    warning: Optional[str]  # too few images for a full-rank covariance


def fid_between(
    source_a: Path, source_b: Path, *, weights: Optional[str], device: str, batch_size: int, progress: bool
) -> FidBetween:
    """The FID of `source_b` against `source_a`, each an image folder or `.npz` statistics. Both
    are read first, so that a source FID cannot use is refused before the Inception network
    loads; two `.npz` files are statistics already, so no network is loaded for them."""
    read_a, read_b = read_source(source_a), read_source(source_b)
    folders = [read for read in (read_a, read_b) if not isinstance(read, FeatureStats)]
    features = inception_features(weights, device, batch_size, progress=progress) if folders else None
    a = read_a if isinstance(read_a, FeatureStats) else FeatureStats.from_features(features_of_images(read_a, features))
    reference = FrechetReference.from_stats(a.mu, a.sigma)
    if isinstance(read_b, FeatureStats):
        value, stderr, count = reference.fid_from_stats(read_b.mu, read_b.sigma), None, read_b.num_images
    else:
        b_features = features_of_images(read_b, features)
        count = b_features.shape[0]
        value = reference.fid(b_features)
        groups = min(FID_JACKKNIFE_GROUPS, count - 2)
        stderr = fid_jackknife(reference, b_features, num_groups=groups).stderr if count >= 4 else None
    spread = f" ± {stderr:.2g}" if stderr is not None else ""
    line = f"FID: {value:.6g}{spread} ({_described(count, source_b)} against {_described(a.num_images, source_a)})"
    return FidBetween(line, small_sample_note(count) if 0 < count < FEATURE_DIMS else None)


def _described(num_images: int, source: Path) -> str:
    """`N images of NAME`, or the name alone: a statistics file may not record its count."""
    return f"{num_images} images of {source.name}" if num_images > 0 else source.name
