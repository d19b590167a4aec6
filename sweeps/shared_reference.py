"""The sweep's one FID reference, computed by the launcher before any trial starts and stored
with the experiment, beside the FID floor of the same conditions."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional

from diffusion_lib.build import resolve_device
from diffusion_lib.config import FidConfig
from diffusion_lib.data import ImageDataset
from diffusion_lib.metrics.fid import (
    FeatureExtractor,
    FidReference,
    InceptionFeatures,
    fid_comparability,
    fid_floor,
    reference_file_name,
    reference_images,
    reference_statistics,
)
from diffusion_lib.run_files import FLOOR_FILE, FidFloor
from record import storage
from record.files import REFERENCE_DIR

from .spec import SweepSpec


def shares_fid_reference(spec: SweepSpec) -> bool:
    """Whether the launcher computes the sweep's one FID reference: FID is on, the searched keys
    leave the reference alone (data, fid.ref_num_images) and the user gave no reference file."""
    per_trial = any(key in ("data", "fid.ref_num_images") or key.startswith("data.") for key in spec.dotted_keys())
    return spec.fid_enabled and not per_trial and not spec.run_config.fid.reference


def with_shared_fid_reference(
    spec: SweepSpec,
    data: ImageDataset,
    features: Optional[FeatureExtractor],
    say: Callable[[str], None] = lambda line: None,
) -> SweepSpec:
    """The spec with `fid.reference` set to reference statistics computed once, here, for all
    trials, and stored with the experiment (it also records which reference every FID of the
    sweep was measured against), beside the FID floor of the same conditions (`fid_floor.json`).
    Otherwise each concurrent trial on a machine with an empty cache would run the same
    Inception pass. Left to the trials when the searched keys change the reference (data,
    fid.ref_num_images) or FID is off; no floor then, nor for a reference the user gave.

    On a URI storage the files are computed in a local folder (seeded with those already
    stored, so a resumed sweep reuses its own) and uploaded; `fid.reference` is then the
    reference's URI, which each trial downloads (sweeps/trainable.py)."""
    config = spec.run_config
    if not shares_fid_reference(spec):
        return spec
    features = features or InceptionFeatures(
        config.fid.weights, resolve_device(config.train.device), config.fid.batch_size, progress=sys.stderr.isatty()
    )
    experiment = spec.experiment_path
    count = min(config.fid.ref_num_images or len(data), len(data))
    say(f"FID reference: {count:,} {data.name} images through Inception, once for the sweep (none if cached already)")
    with storage.local_folder(experiment, seed=_stored_reference_and_floor) as folder:
        reference = _sweep_reference(data, features, config.fid, folder / REFERENCE_DIR)
        _say_once_for_all_trials(config, data, reference, say)
        _say_floor(fid_floor(config, data, features, reference, folder), say)
    reference_location = storage.join(experiment, REFERENCE_DIR, reference.name)
    return dataclasses.replace(spec, run_config=config.with_overrides({"fid.reference": reference_location}))


def _sweep_reference(data: ImageDataset, features: FeatureExtractor, config: FidConfig, folder: Path) -> FidReference:
    """The experiment's own reference when it has one (a resumed sweep keeps the reference its
    FIDs were measured against), else the machine's (`fid.cache_dir`: a second sweep on the same
    data computes none), stored with the experiment."""
    subset = reference_images(data, config.ref_num_images)
    own = folder / reference_file_name(subset)
    if own.is_file():
        return FidReference.load(own)
    reference = reference_statistics(data, features, config.ref_num_images, config.cache_dir)
    reference.save(own)
    return reference


def _stored_reference_and_floor(experiment: str, folder: Path) -> None:
    """A resumed sweep's own reference and floor, so that neither is computed again."""
    storage.download_tree(storage.join(experiment, REFERENCE_DIR), folder / REFERENCE_DIR)
    if storage.exists(storage.join(experiment, FLOOR_FILE)):
        storage.download(storage.join(experiment, FLOOR_FILE), folder / FLOOR_FILE)


def _say_once_for_all_trials(config, data: ImageDataset, reference, say: Callable[[str], None]) -> None:
    """The FID comparability notes every trial would repeat (trials on the shared reference keep
    them to themselves: sweeps/trainable.py)."""
    for note in fid_comparability(config.fid, reference.num_images, data.name):
        say(f"warning: {note}")


def _say_floor(floor: FidFloor, say: Callable[[str], None]) -> None:
    for point in floor.points:
        say(f"FID floor: {floor.sentence(point.num_samples)}")
