"""The Ray Tune trainable: one trial = one diffusion_lib Trainer run.

The trial writes its TensorBoard events, metrics.jsonl, trial.json and sample grids into its
working directory (a fresh local folder for each start of the trial, never the experiment's
trial folder), which Ray syncs to the experiment's storage (`sync_artifacts`). At every
milestone it reports the milestone's metrics with a Ray checkpoint holding the trainer
checkpoint and metrics.jsonl so far, so a restarted trial resumes from it, on any node
(`resume_point`: past a damaged checkpoint too, keeping every milestone recorded).
A `fid.reference` that is a URI (the sweep's shared reference on cloud storage) is downloaded
into the trial's scratch folder and the trainer is handed that local file.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

import pyarrow.fs
import ray
from ray import tune

from diffusion_lib.build import create_trainer
from diffusion_lib.config import ConfigError, RunConfig
from diffusion_lib.metrics.fid import FidComparabilityWarning
from diffusion_lib.run_files import (
    CHECKPOINT_DIR,
    CHECKPOINT_GLOB,
    EVENTS_GLOB,
    METRICS_FILE,
    checkpoint_damage,
    checkpoint_step,
    merge_rows,
    read_metrics,
    write_metrics,
)
from diffusion_lib.trainer import Trainer
from record import storage
from record.files import RAY_CHECKPOINT_GLOB, TrialFile, resume_order, searched_values

# (config, run_dir, *, checkpoint_dir, resume_from, progress) -> Trainer; tests hand in their own.
TrainerFactory = Callable[..., Trainer]


def train_trial(
    searched: dict[str, Any],
    *,
    base: RunConfig,
    make_trainer: TrainerFactory = create_trainer,
    fid_notes_said: bool = False,
    experiment: Optional[str] = None,
) -> None:
    """Ray Tune function trainable; `searched` is the trial's point in the search space. With
    `fid_notes_said`, the launcher has said what limits the FIDs' comparability for all trials.
    `experiment` (a path or URI) is where Ray stores the trial's checkpoints."""
    config = base.with_overrides(searched_values(searched))
    if fid_notes_said:
        warnings.simplefilter("ignore", FidComparabilityWarning)
    run_dir = Path.cwd()
    TrialFile(searched_values(searched), config.flat(), ray.get_runtime_context().get_node_id()).write(run_dir)
    with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as scratch:
        scratch = Path(scratch)
        restored = tune.get_checkpoint()
        resume = None if restored is None else resume_point(restored, scratch, run_dir)
        if resume is None and experiment is not None:
            start_over(storage.join(experiment, run_dir.name), scratch, run_dir)
        try:
            trainer = make_trainer(
                with_local_fid_reference(config, scratch),
                run_dir,
                resume_from=resume.local if resume else None,
                checkpoint_dir=scratch / CHECKPOINT_DIR,
                progress=False,
            )
        except ConfigError as err:
            if resume is None:
                raise
            # Named by the experiment's file, not by its copy in the scratch folder.
            raise ConfigError(str(err).replace(str(resume.local), resume.location)) from None

        def report(row: dict[str, Any], checkpoint_path: Path) -> None:
            if experiment is not None:  # a copy that fills the disk would leave Ray no room for its own state
                storage.require_room(experiment, checkpoint_path.stat().st_size)
            staged = Path(tempfile.mkdtemp(dir=scratch, prefix="report-"))
            os.link(checkpoint_path, staged / checkpoint_path.name)
            shutil.copy(run_dir / METRICS_FILE, staged / METRICS_FILE)
            tune.report(
                {k: v for k, v in row.items() if v is not None}, checkpoint=tune.Checkpoint.from_directory(str(staged))
            )
            shutil.rmtree(staged, ignore_errors=True)

        trainer.fit(on_milestone=report)


@dataclass(frozen=True)
class ResumePoint:
    """The trainer checkpoint a restarted trial resumes from."""

    local: Path  # its copy in the trial's scratch folder, which the trainer loads
    location: str  # the file in the experiment, as the user names it


def resume_point(restored: tune.Checkpoint, scratch: Path, run_dir: Path) -> Optional[ResumePoint]:
    """Where a restarted trial resumes from (None: step 0), with its record made whole in
    `run_dir`. Ray hands the trial its latest checkpoint (`restored`); when that file is damaged
    (`run_files.checkpoint_damage`), the trial falls back to the newest whole one Ray wrote
    before it in the trial's folder (`record.files.resume_order`), or starts over, saying so in
    one line that names the files in the experiment. The trial's metrics.jsonl rows in the
    experiment, in `run_dir` and in the copy each checkpoint read holds are merged into
    `run_dir`'s (`run_files.merge_rows`): a milestone once recorded is never deleted, and one
    measured again is not recorded twice. Works on any storage (through `restored.filesystem`)."""
    fs = restored.filesystem
    restored_folder = PurePosixPath(restored.path)
    trial_path = restored_folder.parent
    rows = [_stored_rows(fs, trial_path / METRICS_FILE, scratch), read_metrics(run_dir / METRICS_FILE)]
    stored = _stored_checkpoints(fs, trial_path)
    unreadable = []
    if not any(path.parent == restored_folder for path in stored):
        unreadable.append(f"{storage.location_of(fs, str(restored_folder))} holds no {CHECKPOINT_GLOB}")
    chosen = None
    for candidate in resume_order(stored, restored_folder.name):
        local_folder = scratch / "restored" / candidate.parent.name
        if not local_folder.is_dir():
            tune.Checkpoint(str(candidate.parent), filesystem=fs).to_directory(str(local_folder))
        rows.append(read_metrics(local_folder / METRICS_FILE))
        location = storage.location_of(fs, str(candidate))
        damage = checkpoint_damage(local_folder / candidate.name)
        if damage is None:
            chosen = ResumePoint(local_folder / candidate.name, location)
            break
        unreadable.append(f"checkpoint {location} unreadable ({damage})")
    write_metrics(run_dir / METRICS_FILE, merge_rows(*rows))
    if unreadable:
        then = (
            f"continues from step {checkpoint_step(chosen.local.name)} ({chosen.location})"
            if chosen
            else "no whole checkpoint left: starts over from step 0"
        )
        warnings.warn(f"trial {run_dir.name}: {'; '.join(unreadable)}; {then}", stacklevel=2)
    return chosen


def _stored_checkpoints(fs: pyarrow.fs.FileSystem, trial_path: PurePosixPath) -> list[PurePosixPath]:
    """The trainer checkpoints in the trial's Ray checkpoint folders in the experiment."""
    selector = pyarrow.fs.FileSelector(str(trial_path), recursive=True, allow_not_found=True)
    return [
        path
        for path in (PurePosixPath(info.path) for info in fs.get_file_info(selector))
        if path.parent.parent == trial_path
        and path.parent.match(RAY_CHECKPOINT_GLOB)
        and checkpoint_step(path.name) is not None
    ]


def start_over(trial_location: str, scratch: Path, run_dir: Path) -> None:
    """A trial starting from step 0 whose folder in the experiment holds an earlier attempt's
    record (Ray restarted it before any checkpoint of it was stored, or none was left whole):
    the rows that attempt recorded are kept, merged into `run_dir`'s, and its TensorBoard events
    there are removed, as `RunLog.open` removes the local ones of a fresh start: this attempt
    writes every milestone's scalars anew, from the recorded rows, so that none shows twice."""
    fs, path = storage.resolve(trial_location)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    stale_events = [info.path for info in found if fnmatch.fnmatch(info.base_name, EVENTS_GLOB)]
    recorded = _stored_rows(fs, PurePosixPath(path) / METRICS_FILE, scratch)
    if recorded:
        write_metrics(run_dir / METRICS_FILE, merge_rows(recorded, read_metrics(run_dir / METRICS_FILE)))
    for stale in stale_events:
        fs.delete_file(stale)


def _stored_rows(fs: pyarrow.fs.FileSystem, path: PurePosixPath, scratch: Path) -> list[dict[str, Any]]:
    """The rows of the trial's metrics.jsonl in the experiment (none when it has none yet)."""
    info = fs.get_file_info(str(path))
    if info.type != pyarrow.fs.FileType.File:
        return []
    local = scratch / "recorded" / METRICS_FILE
    storage.fetch_all(fs, [(local, info)])
    return read_metrics(local)


def with_local_fid_reference(config: RunConfig, scratch: Path) -> RunConfig:
    """The config with a URI `fid.reference` downloaded into `scratch` and named by its local
    path (the trainer loads a local file); any other config as it is. trial.json keeps the URI."""
    reference = config.fid.reference
    if not reference or not storage.is_uri(reference):
        return config
    local = storage.download(reference, scratch / "fid_reference" / storage.name_of(reference))
    return config.with_overrides({"fid.reference": str(local)})
