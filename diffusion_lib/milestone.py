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
    kind: type  # int, float, str, or list (of floats)
    meaning: str
    rankable: bool = False  # a sweep may rank trials by it (spec `metric`)


STEP = Metric("step", int, "training steps taken")
IMAGES_SEEN = Metric("images_seen", int, "training images drawn so far (step × batch size)")
WALL_TIME = Metric("wall_time_s", float, "seconds of training and milestone work so far (resumed runs add up)")
TRAIN_LOSS = Metric("train/loss", float, "mean weighted training loss since the previous milestone", rankable=True)
_BUCKET_MEANING = (
    "mean training loss since the previous milestone for t in [{lo}·T/%d, {hi}·T/%d) (NaN: no t drawn there)"
    % (NUM_T_BUCKETS, NUM_T_BUCKETS)
)
T_BUCKETS = tuple(
    Metric(f"loss/t_bucket_{i}", float, _BUCKET_MEANING.format(lo=i, hi=i + 1)) for i in range(NUM_T_BUCKETS)
)
FID = Metric(
    "val/fid",
    float,
    "FID of `fid.num_samples` EMA samples against the reference statistics, "
    "the same count at every milestone (the last one too)",
    rankable=True,
)
FID_STDERR = Metric(
    "val/fid_stderr",
    float,
    "standard error of `val/fid` over the generated samples (delete-d jackknife; reference held fixed)",
)
FID_REPLICATES = Metric(
    "val/fid_jackknife",
    list,
    "the jackknife's FIDs without each of 25 sample groups: "
    "milestones and trials sampled from the same `eval.seed` delete the same samples, "
    "so the standard error of a difference of two FIDs comes from the differences of their replicates (paired)",
)
FID_NUM_SAMPLES = Metric("val/fid_num_samples", int, "generated images behind `val/fid` and `val/kid`")
FID_REF_NUM_IMAGES = Metric(
    "val/fid_ref_num_images", int, "real images behind the reference statistics (CIFAR-10's training set: 50,000)"
)
FID_REFERENCE = Metric(
    "val/fid_reference", str, "file name of the reference statistics every FID and KID of the run is measured against"
)
BEST_FID = Metric(
    "val/best_fid", float, "lowest `val/fid` of the run so far (one sample count, so comparable)", rankable=True
)
KID = Metric(
    "val/kid",
    float,
    "KID (Bińkowski et al. 2018) of the same samples: unbiased, so comparable across sample counts",
    rankable=True,
)
KID_STDERR = Metric("val/kid_stderr", float, "standard error of `val/kid`")
FINAL_FID = Metric(
    "val/final_fid",
    float,
    "after the last step only: FID of `fid.final_num_samples` samples; compare only with final FIDs at the same count",
)
FINAL_FID_STDERR = Metric("val/final_fid_stderr", float, "standard error of `val/final_fid`")
FINAL_FID_NUM_SAMPLES = Metric(
    "val/final_fid_num_samples", int, "generated images behind `val/final_fid` and `val/final_kid`"
)
FINAL_KID = Metric("val/final_kid", float, "after the last step only: KID of the final samples")
FINAL_KID_STDERR = Metric("val/final_kid_stderr", float, "standard error of `val/final_kid`")
CURVATURE = Metric(
    "curvature/hutch_trace_mean",
    float,
    "Hutchinson estimate of the Hessian trace of the unweighted ε-space MSE on the fixed probe batch",
    rankable=True,
)
CURVATURE_STDERR = Metric(
    "curvature/hutch_trace_stderr", float, "standard error of `curvature/hutch_trace_mean` over the probes"
)

MILESTONE_METRICS: tuple[Metric, ...] = (
    STEP,
    TRAIN_LOSS,
    FID,
    FID_NUM_SAMPLES,
    CURVATURE,
    CURVATURE_STDERR,
    *T_BUCKETS,
    WALL_TIME,
    IMAGES_SEEN,
    FID_STDERR,
    FID_REPLICATES,
    FID_REF_NUM_IMAGES,
    FID_REFERENCE,
    BEST_FID,
    KID,
    KID_STDERR,
    FINAL_FID,
    FINAL_FID_STDERR,
    FINAL_FID_NUM_SAMPLES,
    FINAL_KID,
    FINAL_KID_STDERR,
)
# The metrics TensorBoard's HParams view shows beside each trial's hyperparameters.
HPARAMS_METRICS = (FID, FID_STDERR, KID, BEST_FID, TRAIN_LOSS, CURVATURE, FINAL_FID)
RANKABLE = tuple(m.name for m in MILESTONE_METRICS if m.rankable)


def t_bucket(t, num_timesteps: int):
    """The bucket index of timestep(s) t (ints or a tensor)."""
    return t * NUM_T_BUCKETS // num_timesteps


def markdown_table() -> str:
    """The README's metric table."""
    lines = ["| metric | type | meaning |", "|---|---|---|"]
    for metric in MILESTONE_METRICS:
        if metric is T_BUCKETS[0]:
            lines.append(
                f"| `loss/t_bucket_i`, i = 0 … {NUM_T_BUCKETS - 1} | float | "
                f"{_BUCKET_MEANING.format(lo='i', hi='(i+1)')} |"
            )
        elif metric not in T_BUCKETS:
            lines.append(f"| `{metric.name}` | {metric.kind.__name__} | {metric.meaning} |")
    return "\n".join(lines)
