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
from diffusion_lib.milestone import (
    CURVATURE,
    FID,
    FID_NUM_SAMPLES,
    FID_REF_NUM_IMAGES,
    FID_STDERR,
    FINAL_FID,
    FINAL_FID_NUM_SAMPLES,
    FINAL_FID_STDERR,
    IMAGES_SEEN,
    MILESTONE_METRICS,
    STEP,
    TRAIN_LOSS,
    WALL_TIME,
    Metric,
)
from record.experiment import Experiment

from .decisions import Configuration


def arrow_type(metric: Metric) -> pa.DataType:
    return {int: pa.int64(), float: pa.float64(), str: pa.string(), list: pa.list_(pa.float64())}[metric.kind]


MILESTONES_SCHEMA = pa.schema([("trial_id", pa.string()), *[(m.name, arrow_type(m)) for m in MILESTONE_METRICS]])
FINAL_METRICS = [
    TRAIN_LOSS,
    FID,
    FID_NUM_SAMPLES,
    CURVATURE,
    FINAL_FID,
    FINAL_FID_STDERR,
    FINAL_FID_NUM_SAMPLES,
    FID_REF_NUM_IMAGES,
]
TRIAL_COLUMNS = pa.schema(
    [
        ("trial_id", pa.string()),
        ("state", pa.string()),
        ("error", pa.string()),
        ("best.metric", pa.string()),
        ("best.value", pa.float64()),
        ("best.step", pa.int64()),
        ("best.val/fid", pa.float64()),
        ("best.val/fid_stderr", pa.float64()),
        ("best.val/fid_step", pa.int64()),
        ("final.step", pa.int64()),
        *[(f"final.{m.name}", arrow_type(m)) for m in FINAL_METRICS],
        (WALL_TIME.name, arrow_type(WALL_TIME)),
        (IMAGES_SEEN.name, arrow_type(IMAGES_SEEN)),
        ("best_checkpoint", pa.string()),
    ]
)


def milestones_table(experiment: Experiment) -> pa.Table:
    rows = [
        {"trial_id": trial.trial_id, **{m.name: row.get(m.name) for m in MILESTONE_METRICS}}
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
    metric = experiment.metric
    rows = []
    for trial in experiment.trials:
        best = experiment.best(trial)
        best_fid = experiment.best(trial, FID.name)
        best_saved = experiment.best(trial, checkpointed=True)
        last = trial.milestones[-1] if trial.milestones else {}
        rows.append(
            {
                "trial_id": trial.trial_id,
                "state": trial.state,
                "error": trial.error,
                "best.metric": metric,
                "best.value": best[metric] if best else None,
                "best.step": best[STEP.name] if best else None,
                "best.val/fid": best_fid[FID.name] if best_fid else None,
                "best.val/fid_stderr": best_fid.get(FID_STDERR.name) if best_fid else None,
                "best.val/fid_step": best_fid[STEP.name] if best_fid else None,
                "final.step": last.get(STEP.name),
                **{f"final.{m.name}": last.get(m.name) for m in FINAL_METRICS},
                WALL_TIME.name: last.get(WALL_TIME.name),
                IMAGES_SEEN.name: last.get(IMAGES_SEEN.name),
                "best_checkpoint": str(trial.checkpoints[best_saved[STEP.name]]) if best_saved else None,
            }
        )
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


def configurations_table(configs: list[Configuration]) -> pa.Table:
    """One row per configuration (trials sharing every searched value but the seed): its searched
    values as JSON, the seeds behind it, and mean, sd and standard error of the best FID."""
    rows = [
        {
            "searched": json.dumps(c.searched, sort_keys=True),
            "trials": ",".join(t.trial_id for t in c.trials),
            "seeds": len(c.best_fids),
            "mean_best_fid": c.mean,
            "sd_best_fid": c.sd,
            "stderr_best_fid": c.stderr,
        }
        for c in configs
    ]
    return pa.Table.from_pylist(rows, schema=CONFIGURATIONS_SCHEMA)


CONFIGURATIONS_SCHEMA = pa.schema(
    [
        ("searched", pa.string()),
        ("trials", pa.string()),
        ("seeds", pa.int64()),
        ("mean_best_fid", pa.float64()),
        ("sd_best_fid", pa.float64()),
        ("stderr_best_fid", pa.float64()),
    ]
)
