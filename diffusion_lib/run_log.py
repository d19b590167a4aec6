"""What a run writes for people and tools: `metrics.jsonl` (one JSON object per milestone),
TensorBoard scalars, sample grids and hparams, and PNG sample grids."""

# TensorBoard's HParams view: a run's hyperparameters are written when it starts (not when it
# ends, which a trial stopped by ASHA never reaches), and the view's metric columns read the
# latest value of each declared scalar tag, so running, stopped and errored runs all show.

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_api
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from .atomic import atomic_path
from .milestone import HPARAMS_METRICS, STEP
from .run_files import (
    EVENTS_GLOB,
    METRICS_FILE,
    SAMPLES_DIR,
    SESSION_END_FILE,
    merge_rows,
    read_metrics,
    sample_grid_name,
    write_metrics,
)


def hparams_value(value: Any) -> Any:
    """A config value as the HParams plugin takes it (numbers, strings, bools; lists as text)."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class RunLog:
    """The run's metrics.jsonl, TensorBoard events and sample grids, opened when training starts.

    metrics.jsonl is written whole, atomically, at every milestone (a reader or a crash never
    leaves a torn line), and a milestone once recorded is never deleted: a run resumed from a
    checkpoint older than its last recorded milestone measures the milestones after it again,
    and keeps the rows recorded for them (`run_files.merge_rows`)."""

    def __init__(self, run_dir: Path, writer: SummaryWriter, rows: list[dict[str, Any]]):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.writer = writer
        self.rows = rows

    @classmethod
    def open(cls, run_dir: Path, resume_step: int, hparams: dict[str, Any]) -> "RunLog":
        """Open the log of a run starting (resume_step 0) or resuming at `resume_step`. Its
        recorded rows are kept, written back whole (a torn line an older writer's crash left is
        dropped); TensorBoard events past `resume_step` are hidden, the milestones measured again
        write them anew."""
        run_dir = Path(run_dir)
        rows = merge_rows(read_metrics(run_dir / METRICS_FILE))
        write_metrics(run_dir / METRICS_FILE, rows)
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
        return cls(run_dir, writer, rows)

    def milestone(self, row: dict[str, Any], grid: Optional[torch.Tensor]) -> dict[str, Any]:
        """Record one milestone: its metrics.jsonl row (unless one is recorded for its step
        already), TensorBoard scalars and the sample grid; return the row recorded for it."""
        step = row[STEP.name]
        merged = merge_rows(self.rows, [row])
        if len(merged) > len(self.rows):
            self.rows = merged
            write_metrics(self.metrics_path, self.rows)
        row = next(recorded for recorded in self.rows if recorded[STEP.name] == step)
        for key, value in row.items():
            if key != STEP.name and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if grid is not None:
            self.writer.add_image("samples", grid, step)
            save_png(grid, self.run_dir / SAMPLES_DIR / sample_grid_name(step))
        self.writer.flush()
        return row

    def close(self) -> None:
        self.writer.close()


def make_grid(images_uint8: torch.Tensor) -> torch.Tensor:
    """A square-ish grid (3, H, W) in [0, 1] from uint8 images."""
    import torchvision.utils  # its import loads torch._dynamo (seconds): only where grids are drawn

    nrow = max(1, int(math.sqrt(images_uint8.shape[0])))
    return torchvision.utils.make_grid(images_uint8.float().div(255), nrow=nrow, padding=2)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """A (3, H, W) image in [0, 1] as a PNG, written atomically."""
    import torchvision.utils

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
    # The events file's records written here, in this thread: a SummaryWriter writes them from a
    # thread of its own, which prints a traceback of its own when the disk is full.
    events = [
        event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"),  # how every events file starts
        event_pb2.Event(wall_time=time.time(), summary=summary),
    ]
    with atomic_path(run_dir / SESSION_END_FILE) as tmp, open(tmp, "wb") as out:
        records = RecordWriter(out)
        for event in events:
            records.write(event.SerializeToString())
    return run_dir / SESSION_END_FILE
