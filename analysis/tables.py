"""Arrow tables of an experiment: one row per trial, one row per trial × milestone.

Metric columns carry the trainer's names (`train/loss`, `val/fid`, …); trial-level summaries
prefix them with `best.` or `final.`; config keys keep their dotted names. The schemas are
documented in the README and fixed here, so tables from different sweeps concatenate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from diffusion_lib.atomic import atomic_path
from diffusion_lib.trainer import NUM_T_BUCKETS

from .experiment import Experiment

MILESTONE_METRICS = [
    ("train/loss", pa.float64()),
    ("val/fid", pa.float64()),
    ("val/fid_num_samples", pa.int64()),
    ("curvature/hutch_trace_mean", pa.float64()),
    ("curvature/hutch_trace_stderr", pa.float64()),
    *[(f"loss/t_bucket_{i}", pa.float64()) for i in range(NUM_T_BUCKETS)],
    ("wall_time_s", pa.float64()),
    ("images_seen", pa.int64()),
]
MILESTONES_SCHEMA = pa.schema([("trial_id", pa.string()), ("step", pa.int64()), *MILESTONE_METRICS])
FINAL_METRICS = ["train/loss", "val/fid", "val/fid_num_samples", "curvature/hutch_trace_mean"]
TRIAL_COLUMNS = pa.schema(
    [
        ("trial_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("best.metric", pa.string()),
        ("best.value", pa.float64()),
        ("best.step", pa.int64()),
        ("best.val/fid", pa.float64()),
        ("best.val/fid_step", pa.int64()),
        ("final.step", pa.int64()),
        *[(f"final.{m}", pa.int64() if m.endswith("num_samples") else pa.float64()) for m in FINAL_METRICS],
        ("wall_time_s", pa.float64()),
        ("images_seen", pa.int64()),
        ("best_checkpoint", pa.string()),
    ]
)


def milestones_table(experiment: Experiment) -> pa.Table:
    rows = [
        {"trial_id": trial.trial_id, "step": row["step"], **{name: row.get(name) for name, _ in MILESTONE_METRICS}}
        for trial in experiment.trials
        for row in trial.milestones
    ]
    return pa.Table.from_pylist(rows, schema=MILESTONES_SCHEMA)


def _config_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _config_value(value: Any, kind: pa.DataType) -> Any:
    if value is None or kind != pa.string():
        return value
    return value if isinstance(value, str) else json.dumps(value)


def trials_table(experiment: Experiment) -> pa.Table:
    metric, mode = experiment.metric, experiment.mode
    rows = []
    for trial in experiment.trials:
        best = trial.best_milestone(metric, mode)
        best_fid = trial.best_milestone("val/fid", "min")
        best_saved = trial.best_milestone(metric, mode, checkpointed=True)
        last = trial.milestones[-1] if trial.milestones else {}
        rows.append({
            "trial_id": trial.trial_id,
            "status": trial.status,
            "error": trial.error,
            "best.metric": metric,
            "best.value": best[metric] if best else None,
            "best.step": best["step"] if best else None,
            "best.val/fid": best_fid["val/fid"] if best_fid else None,
            "best.val/fid_step": best_fid["step"] if best_fid else None,
            "final.step": last.get("step"),
            **{f"final.{m}": last.get(m) for m in FINAL_METRICS},
            "wall_time_s": last.get("wall_time_s"),
            "images_seen": last.get("images_seen"),
            "best_checkpoint": str(trial.checkpoints[best_saved["step"]]) if best_saved else None,
        })
    table = pa.Table.from_pylist(rows, schema=TRIAL_COLUMNS)
    config_keys = sorted({k for t in experiment.trials for k in t.config})
    for key in config_keys:
        values = [t.config.get(key) for t in experiment.trials]
        kind = _config_type(values)
        table = table.append_column(pa.field(key, kind), pa.array([_config_value(v, kind) for v in values], type=kind))
    return table


def write_table(table: pa.Table, out_dir: Path, stem: str, arrow_too: bool = False) -> None:
    """Write `stem.parquet` (and `stem.arrow`, Arrow IPC) atomically."""
    with atomic_path(out_dir / f"{stem}.parquet") as tmp:
        pq.write_table(table, tmp)
    if arrow_too:
        with atomic_path(out_dir / f"{stem}.arrow") as tmp:
            feather.write_feather(table, tmp, compression="uncompressed")
