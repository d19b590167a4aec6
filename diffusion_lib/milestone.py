"""The milestone row: every metric a run reports, declared once.

The trainer fills one row per milestone under these names; `metrics.jsonl`, TensorBoard, Ray
Tune reports, the sweep spec's allowed metrics, the analysis tables and plots and the README's
metric table all take their names, types and meanings from here.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_T_BUCKETS = 10  # the per-timestep loss is split into this many equal ranges of t


@dataclass(frozen=True)
class Metric:
    name: str
    kind: type  # int or float
    meaning: str
    rankable: bool = False  # a sweep may rank trials by it (spec `metric`)


STEP = Metric("step", int, "training steps taken")
IMAGES_SEEN = Metric("images_seen", int, "training images drawn so far (step × batch size)")
WALL_TIME = Metric("wall_time_s", float, "seconds of training and milestone work so far (resumed runs add up)")
TRAIN_LOSS = Metric("train/loss", float, "mean weighted training loss since the previous milestone", rankable=True)
_BUCKET_MEANING = "mean training loss since the previous milestone for t in [{lo}·T/%d, {hi}·T/%d) (NaN: no t drawn there)" % (NUM_T_BUCKETS, NUM_T_BUCKETS)
T_BUCKETS = tuple(Metric(f"loss/t_bucket_{i}", float, _BUCKET_MEANING.format(lo=i, hi=i + 1)) for i in range(NUM_T_BUCKETS))
FID = Metric("val/fid", float, "FID of `val/fid_num_samples` EMA samples against the reference statistics", rankable=True)
FID_NUM_SAMPLES = Metric("val/fid_num_samples", int, "generated images behind `val/fid`")
CURVATURE = Metric("curvature/hutch_trace_mean", float, "Hutchinson estimate of the loss Hessian's trace on the fixed probe batch", rankable=True)
CURVATURE_STDERR = Metric("curvature/hutch_trace_stderr", float, "standard error of `curvature/hutch_trace_mean` over the probes")

MILESTONE_METRICS: tuple[Metric, ...] = (
    STEP, TRAIN_LOSS, FID, FID_NUM_SAMPLES, CURVATURE, CURVATURE_STDERR, *T_BUCKETS, WALL_TIME, IMAGES_SEEN,
)
BY_NAME = {m.name: m for m in MILESTONE_METRICS}
RANKABLE = tuple(m.name for m in MILESTONE_METRICS if m.rankable)


def t_bucket(t, num_timesteps: int):
    """The bucket index of timestep(s) t (ints or a tensor)."""
    return t * NUM_T_BUCKETS // num_timesteps


def markdown_table() -> str:
    """The README's metric table."""
    lines = ["| metric | type | meaning |", "|---|---|---|"]
    for metric in MILESTONE_METRICS:
        if metric is T_BUCKETS[0]:
            lines.append(f"| `loss/t_bucket_i`, i = 0 … {NUM_T_BUCKETS - 1} | float | {_BUCKET_MEANING.format(lo='i', hi='(i+1)')} |")
        elif metric not in T_BUCKETS:
            lines.append(f"| `{metric.name}` | {metric.kind.__name__} | {metric.meaning} |")
    return "\n".join(lines)
