"""What a run writes for people and tools: `metrics.jsonl` (one JSON object per milestone),
TensorBoard scalars, sample grids and hparams, and PNG sample grids."""

# TensorBoard's HParams view: a run's hyperparameters are written when it starts (not when it
# ends, which a trial stopped by ASHA never reaches), and the view's metric columns read the
# latest value of each declared scalar tag, so running, stopped and errored runs all show.

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision.utils
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_api
from torch.utils.tensorboard import SummaryWriter

from .atomic import atomic_path, atomic_write_text
from .milestone import HPARAMS_METRICS, STEP
from .run_files import (
    EVENTS_GLOB,
    METRICS_FILE,
    SAMPLES_DIR,
    SESSION_END_FILE,
    metrics_line,
    read_metrics,
    sample_grid_name,
)


def hparams_value(value: Any) -> Any:
    """A config value as the HParams plugin takes it (numbers, strings, bools; lists as text)."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class RunLog:
    """The run's metrics.jsonl, TensorBoard events and sample grids, opened when training starts."""

    def __init__(self, run_dir: Path, writer: SummaryWriter):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path, resume_step: int, hparams: dict[str, Any]) -> "RunLog":
        """Open the log of a run starting (resume_step 0) or resuming at `resume_step`: rows and
        events past that step are from milestones that will be recomputed, so they are dropped."""
        run_dir = Path(run_dir)
        metrics_path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(metrics_path) if r[STEP.name] <= resume_step]
        atomic_write_text(metrics_path, "".join(metrics_line(r) for r in kept))
        if resume_step == 0:  # a fresh start: events of an attempt that never checkpointed are stale
            for stale in run_dir.glob(EVENTS_GLOB):
                stale.unlink()
        (run_dir / SESSION_END_FILE).unlink(missing_ok=True)  # running again: how it ends is not known yet
        # purge_step hides TensorBoard events past the checkpoint written before a crash.
        writer = SummaryWriter(log_dir=str(run_dir), purge_step=resume_step + 1 if resume_step else None)
        if resume_step == 0:  # a resumed run keeps the session it started with: one per run
            session = hparams_api.hparams_pb({k: hparams_value(v) for k, v in hparams.items()}, trial_id=run_dir.name)
            writer.file_writer.add_summary(session)
            writer.flush()
        return cls(run_dir, writer)

    def milestone(self, row: dict[str, Any], grid: Optional[torch.Tensor]) -> None:
        """Append one milestone: a metrics.jsonl line, TensorBoard scalars and the sample grid."""
        step = row[STEP.name]
        with open(self.metrics_path, "a") as f:
            f.write(metrics_line(row))
        for key, value in row.items():
            if key != STEP.name and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if grid is not None:
            self.writer.add_image("samples", grid, step)
            save_png(grid, self.run_dir / SAMPLES_DIR / sample_grid_name(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_grid(images_uint8: torch.Tensor) -> torch.Tensor:
    """A square-ish grid (3, H, W) in [0, 1] from uint8 images."""
    nrow = max(1, int(math.sqrt(images_uint8.shape[0])))
    return torchvision.utils.make_grid(images_uint8.float().div(255), nrow=nrow, padding=2)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """A (3, H, W) image in [0, 1] as a PNG, written atomically."""
    with atomic_path(path) as tmp:
        torchvision.utils.save_image(grid, tmp, format="png")


def write_hparams_config(log_dir: Path, hparam_names: list[str]) -> None:
    """The HParams view's experiment: which hyperparameters are columns and which scalar tags are
    its metrics (`milestone.HPARAMS_METRICS`). Written once, where TensorBoard's logdir starts:
    a sweep's directory for all its trials, or a single run's own directory."""
    config = hparams_api.hparams_config_pb(
        hparams=[hparams_api.HParam(name) for name in hparam_names],
        metrics=[hparams_api.Metric(metric.name) for metric in HPARAMS_METRICS],
    )
    with SummaryWriter(log_dir=str(log_dir), filename_suffix=".hparams") as writer:
        writer.file_writer.add_summary(config)


def write_session_end(run_dir: Path, succeeded: bool) -> Path:
    """How the run's HParams session ended, for the Status filter of TensorBoard's HParams tab:
    Success, or Failure for a run that errored. Written once the run has ended (TensorBoard
    keeps the first status it reads for a run, so none is written while it runs: a running run
    reads Unknown), as `SESSION_END_FILE`, atomically, replacing an earlier one."""
    status = api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE
    end_info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.SESSION_END_INFO_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end_info)),
        tensor=metadata.NULL_TENSOR,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".session-end-") as scratch:
        with SummaryWriter(log_dir=scratch) as writer:
            writer.file_writer.add_summary(summary)
        (written,) = Path(scratch).glob(EVENTS_GLOB)
        os.replace(written, run_dir / SESSION_END_FILE)
    return run_dir / SESSION_END_FILE
