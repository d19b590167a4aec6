"""The Ray Tune trainable: one trial = one diffusion_lib Trainer run.

The trial writes its TensorBoard events, metrics.jsonl, trial.json and sample grids into its
working directory, which Ray syncs to the experiment's storage (`sync_artifacts`). At every
milestone it reports the milestone's metrics with a Ray checkpoint holding the trainer
checkpoint and metrics.jsonl so far, so a restarted trial resumes from it, on any node.
A `fid.reference` that is a URI (the sweep's shared reference on cloud storage) is downloaded
into the trial's scratch folder and the trainer is handed that local file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from diffusion_lib.build import create_trainer
from diffusion_lib.config import RunConfig
from diffusion_lib.metrics.fid import FidComparabilityWarning
from diffusion_lib.run_files import CHECKPOINT_DIR, CHECKPOINT_GLOB, METRICS_FILE
from diffusion_lib.trainer import Trainer
from record import storage
from record.files import TrialFile, searched_values

# (config, run_dir, *, checkpoint_dir, resume_from, progress) -> Trainer; tests hand in their own.
TrainerFactory = Callable[..., Trainer]


def train_trial(
    searched: dict[str, Any],
    *,
    base: RunConfig,
    make_trainer: TrainerFactory = create_trainer,
    fid_notes_said: bool = False,
) -> None:
    """Ray Tune function trainable; `searched` is the trial's point in the search space. With
    `fid_notes_said`, the launcher has said what limits the FIDs' comparability for all trials."""
    config = base.with_overrides(searched_values(searched))
    if fid_notes_said:
        warnings.simplefilter("ignore", FidComparabilityWarning)
    run_dir = Path.cwd()
    TrialFile(searched_values(searched), config.flat(), ray.get_runtime_context().get_node_id()).write(run_dir)
    with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as scratch:
        scratch = Path(scratch)
        resume_from = None
        restored = tune.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(scratch / "restored"))
            resume_from = next((scratch / "restored").glob(CHECKPOINT_GLOB))
            shutil.copy(scratch / "restored" / METRICS_FILE, run_dir / METRICS_FILE)

        trainer = make_trainer(
            with_local_fid_reference(config, scratch),
            run_dir,
            resume_from=resume_from,
            checkpoint_dir=scratch / CHECKPOINT_DIR,
            progress=False,
        )

        def report(row: dict[str, Any], checkpoint_path: Path) -> None:
            staged = Path(tempfile.mkdtemp(dir=scratch, prefix="report-"))
            os.link(checkpoint_path, staged / checkpoint_path.name)
            shutil.copy(run_dir / METRICS_FILE, staged / METRICS_FILE)
            tune.report(
                {k: v for k, v in row.items() if v is not None}, checkpoint=tune.Checkpoint.from_directory(str(staged))
            )
            shutil.rmtree(staged, ignore_errors=True)

        trainer.fit(on_milestone=report)


def with_local_fid_reference(config: RunConfig, scratch: Path) -> RunConfig:
    """The config with a URI `fid.reference` downloaded into `scratch` and named by its local
    path (the trainer loads a local file); any other config as it is. trial.json keeps the URI."""
    reference = config.fid.reference
    if not reference or not storage.is_uri(reference):
        return config
    local = storage.download(reference, scratch / "fid_reference" / storage.name_of(reference))
    return config.with_overrides({"fid.reference": str(local)})
