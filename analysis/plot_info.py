"""What each image of the report shows, computed from the experiment alone: a figure's lines,
points, axes and FID floor band; which recorded sample grids the report shows, with their
captions, and the checkpoint the denoising diagnostic is drawn from. `analysis/plots.py` only
draws these objects (the split Optuna's visualizations make between `_get_..._info` and a
backend), so what an image shows is decided, and tested, without matplotlib or a checkpoint.

A figure with nothing to draw has no info object (None) and no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from diffusion_lib.config import SEED_KEY
from diffusion_lib.milestone import CURVATURE, FID, FID_NUM_SAMPLES, FID_STDERR, STEP, TRAIN_LOSS, WALL_TIME
from diffusion_lib.run_files import SAMPLES_DIR, sample_grid_name
from record.best import is_finite_number
from record.experiment import Experiment, Trial

from .blocks import format_value

Caption = tuple[str, Path]  # an image of the report: (caption, file)

# Beyond this many trials the best are coloured and labelled, the others drawn grey under one
# legend entry: a legend that fits.
COLOURED = 10


@dataclass(frozen=True)
class FloorBand:
    """The FID floor under the experiment's common FID basis: what real images score at the
    sweep's sample count and reference, drawn as a dashed line with a ± one-standard-error band."""

    fid: float
    stderr: float
    num_samples: int

    @property
    def label(self) -> str:
        return f"real images (N={self.num_samples})"


def floor_band(experiment: Experiment) -> Optional[FloorBand]:
    """The floor to draw on an FID figure; None when none is stored for the common basis, or
    when too few real images were held out to score one."""
    point = experiment.floor_point()
    if point is None or point.fid is None:
        return None
    return FloorBand(fid=point.fid, stderr=point.stderr, num_samples=point.num_samples)


# --- Curves: one metric against step or wall time, one line per trial ------------------------


@dataclass(frozen=True)
class CurvesFigure:
    """Which milestone columns one curves figure plots, and its file name (without .png)."""

    name: str
    x: str
    y: str
    xlabel: str
    ylabel: str
    title: str
    # With `count` (the FID sample count), points measured at different counts are never
    # joined: each count is its own line. With `band` (the FID's standard error), a line
    # carries a ± one-standard-error band.
    count: Optional[str] = None
    band: Optional[str] = None


CURVES_FIGURES = (
    CurvesFigure(
        name="fid_vs_step",
        x=STEP.name,
        y=FID.name,
        xlabel="training step",
        ylabel="FID",
        title="FID vs step (± standard error)",
        count=FID_NUM_SAMPLES.name,
        band=FID_STDERR.name,
    ),
    CurvesFigure(
        name="loss_vs_step",
        x=STEP.name,
        y=TRAIN_LOSS.name,
        xlabel="training step",
        ylabel="training loss",
        title="Loss vs step",
    ),
    CurvesFigure(
        name="curvature_vs_step",
        x=STEP.name,
        y=CURVATURE.name,
        xlabel="training step",
        ylabel="Hutchinson tr(H)",
        title="Curvature vs step",
    ),
    CurvesFigure(
        name="fid_vs_wall_time",
        x=WALL_TIME.name,
        y=FID.name,
        xlabel="wall time (s)",
        ylabel="FID",
        title="FID vs wall time (± standard error)",
        count=FID_NUM_SAMPLES.name,
        band=FID_STDERR.name,
    ),
)


@dataclass(frozen=True)
class Curve:
    """One line: a trial's milestones that reported the figure's x and y (at one FID sample
    count, where the figure splits by count)."""

    trial_id: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    stderrs: tuple[float, ...]  # NaN where a milestone has none: no band there
    coloured: bool  # one of the best trials; otherwise a thin grey line
    label: Optional[str]  # its legend entry; None for every grey line but the first


@dataclass(frozen=True)
class CurvesInfo:
    title: str
    xlabel: str
    ylabel: str
    curves: tuple[Curve, ...]  # in the order drawn: trials as the experiment lists them
    floor: Optional[FloorBand]  # on an FID figure only


def curves_info(experiment: Experiment, figure: CurvesFigure) -> Optional[CurvesInfo]:
    """The lines of `figure.y` against `figure.x` for every trial that reported both; None when
    none did."""
    coloured = set(best_trial_ids(experiment, COLOURED))
    grey_label: Optional[str] = f"{len(experiment.trials) - len(coloured)} other trials"
    curves: list[Curve] = []
    for trial in experiment.trials:
        lines = _points_by_count(trial, figure)
        for count, points in lines.items():
            xs, ys, stderrs = (tuple(float(v) for v in column) for column in zip(*points))
            if trial.trial_id in coloured:
                label = trial.label if len(lines) == 1 else f"{trial.label} (N={count})"
            else:
                label, grey_label = grey_label, None  # one legend entry for all the grey lines
            curves.append(Curve(trial.trial_id, xs, ys, stderrs, coloured=trial.trial_id in coloured, label=label))
    if not curves:
        return None
    floor = floor_band(experiment) if figure.y == FID.name else None
    return CurvesInfo(figure.title, figure.xlabel, figure.ylabel, tuple(curves), floor)


def _points_by_count(trial: Trial, figure: CurvesFigure) -> dict[Any, list[tuple[float, float, float]]]:
    """(x, y, standard error) of each milestone with a finite x and y, by FID sample count (one
    key, None, for a figure that does not split by count)."""
    lines: dict[Any, list[tuple[float, float, float]]] = {}
    for row in trial.milestones:
        if is_finite_number(row.get(figure.x)) and is_finite_number(row.get(figure.y)):
            band = row.get(figure.band) if figure.band else None
            stderr = band if is_finite_number(band) else math.nan
            lines.setdefault(row.get(figure.count) if figure.count else None, []).append(
                (row[figure.x], row[figure.y], stderr)
            )
    return lines


def best_trial_ids(experiment: Experiment, k: int) -> list[str]:
    """The k best trials by the sweep's metric (all of them when there are k or fewer)."""
    if len(experiment.trials) <= k:
        return [t.trial_id for t in experiment.trials]
    sign = 1 if experiment.mode == "min" else -1
    scored = [(t, experiment.best(t)) for t in experiment.trials]
    ranked = sorted((b[experiment.metric] * sign, t.trial_id) for t, b in scored if b is not None)
    return [trial_id for _, trial_id in ranked[:k]]


# --- Best metric by one searched key -----------------------------------------------------------


@dataclass(frozen=True)
class BestByKeyInfo:
    """Each trial's best metric against one searched key: on a category axis (`categories` its
    tick labels, `xs` their indices) or on a numeric one, logarithmic for a key searched on a log
    scale."""

    title: str
    xlabel: str
    ylabel: str
    xs: tuple[Any, ...]
    ys: tuple[float, ...]
    categories: Optional[tuple[str, ...]]  # None: a numeric axis
    log_x: bool
    floor: Optional[FloorBand]  # when the sweep's metric is FID


def best_points(experiment: Experiment, key: str) -> list[tuple[Trial, dict[str, Any]]]:
    """Each trial that searched `key`, with its best milestone (on the common FID basis)."""
    bests = [(trial, experiment.best(trial)) for trial in experiment.trials if key in trial.searched]
    return [(trial, best) for trial, best in bests if best is not None]


def best_by_key_info(experiment: Experiment, key: str) -> Optional[BestByKeyInfo]:
    """The best metric of each trial against `key`; None when the trials took one value of it."""
    metric = experiment.metric
    points = [(trial.searched[key], best[metric]) for trial, best in best_points(experiment, key)]
    if len({str(value) for value, _ in points}) < 2:
        return None
    values = [value for value, _ in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = None if numeric else tuple(sorted({str(v) for v in values}))
    return BestByKeyInfo(
        title=f"best {metric} by {key}",
        xlabel=key,
        ylabel=f"best {metric}",
        xs=tuple(values) if numeric else tuple(categories.index(str(v)) for v in values),
        ys=tuple(best for _, best in points),
        categories=categories,
        log_x=numeric and experiment.searched_on_log_scale(key),
        floor=floor_band(experiment) if metric == FID.name else None,
    )


# --- Sample grids: the ones the best trials recorded; the denoising diagnostic ----------------

DENOISE_FILE = "denoise.png"
DENOISE_ROWS = "x0 | x_t | x̂0, rows t = 0, T/4, T/2, 3T/4, T−1"


@dataclass(frozen=True)
class SampleGridInfo:
    """One trial's sample grid: the one its best milestone recorded (`eval.grid_size` samples
    from the seeded noise its FID samples start from: the first of the very images its FID saw),
    copied, not sampled again."""

    trial_id: str
    recorded: Path  # the trial's samples/step_NNNNNNN.png of its best milestone
    file: str  # best_grid.png for the best trial, grid_rank2.png, ... for the next
    caption: str


@dataclass(frozen=True)
class DenoiseInfo:
    """Where the denoising diagnostic is drawn from: the best trial that kept a checkpoint, at its
    best checkpointed milestone (Ray keeps only the newest and the best checkpoint); the caption
    names both, and says so when that is not the best trial or not its best milestone."""

    trial_id: str
    checkpoint: Path
    caption: str


@dataclass(frozen=True)
class SampleGridsInfo:
    grids: tuple[SampleGridInfo, ...]  # best first
    denoise: Optional[DenoiseInfo]  # None: no trial has a checkpoint
    warnings: tuple[str, ...]  # no checkpoint at all


def ranked_trials(experiment: Experiment) -> list[tuple[Trial, Optional[dict]]]:
    """Every trial with its best milestone, best first; a trial without a comparable one last."""
    metric, sign = experiment.metric, 1 if experiment.mode == "min" else -1
    scored = [(t, experiment.best(t)) for t in experiment.trials]
    return sorted(scored, key=lambda tb: (tb[1] is None, sign * tb[1][metric] if tb[1] else 0.0))


def sample_grids_info(experiment: Experiment, top_k: int) -> SampleGridsInfo:
    """The recorded grids of the `top_k` best trials' best milestones, and the checkpoint the
    denoising diagnostic is drawn from. Whether a recorded grid is there is found when it is
    copied: this decides which files are wanted (a mirror of cloud storage fetches them)."""
    ranked = [(trial, best) for trial, best in ranked_trials(experiment) if best is not None]
    grids = tuple(
        _sample_grid_info(experiment, trial, best, rank) for rank, (trial, best) in enumerate(ranked[:top_k], 1)
    )
    denoise = _denoise_info(experiment, [trial for trial, _ in ranked])
    if denoise is None:
        warning = f"no trial has a checkpoint for a milestone with {experiment.metric}; no denoising diagnostic"
        return SampleGridsInfo(grids=grids, denoise=None, warnings=(warning,))
    return SampleGridsInfo(grids=grids, denoise=denoise, warnings=())


def _denoise_info(experiment: Experiment, ranked: list[Trial]) -> Optional[DenoiseInfo]:
    """The first of the `ranked` trials (best first) with a checkpoint, at its best checkpointed
    milestone; None when none has one."""
    for rank, trial in enumerate(ranked):
        milestone = experiment.best(trial, checkpointed=True)
        if milestone is None:
            continue
        step, metric = milestone[STEP.name], experiment.metric
        notes = [f"{rank} better trial{'s' if rank > 1 else ''} kept no checkpoint of a milestone"] if rank else []
        best_step = experiment.best(trial)[STEP.name]
        if best_step != step:
            notes.append(f"the checkpoint of its best milestone, step {best_step}, was not kept")
        drawn_from = f"{trial.trial_id} at step {step} ({metric} {milestone[metric]:.4g})"
        caption = "; ".join([f"Denoising diagnostic of {drawn_from}: {DENOISE_ROWS}", *notes])
        return DenoiseInfo(trial.trial_id, trial.checkpoints[step], caption)
    return None


def _sample_grid_info(experiment: Experiment, trial: Trial, milestone: dict, rank: int) -> SampleGridInfo:
    """The grid of the trial at `rank` (1: the best), captioned with its milestone's metric."""
    metric, step = experiment.metric, milestone[STEP.name]
    place = "Best" if rank == 1 else f"Rank {rank}"
    return SampleGridInfo(
        trial_id=trial.trial_id,
        recorded=trial.path / SAMPLES_DIR / sample_grid_name(step),
        file="best_grid.png" if rank == 1 else f"grid_rank{rank}.png",
        caption=(
            f"{place}: {trial.label}, step {step}, {metric} {format_value(milestone[metric])} "
            "(the milestone's own samples: the first of those its FID was measured on)"
        ),
    )


# --- Every figure of the report ----------------------------------------------------------------

FigureInfo = Union[CurvesInfo, BestByKeyInfo]


def figure_infos(experiment: Experiment) -> list[tuple[str, FigureInfo]]:
    """Each figure with something to draw, by file name (without .png), in the report's order:
    the curves, then the best metric by each searched key but the seed (seeds are repeats, not
    a knob)."""
    curves = [(figure.name, curves_info(experiment, figure)) for figure in CURVES_FIGURES]
    knobs = [key for key in experiment.searched_keys if key != SEED_KEY]
    bests = [(f"best_by_{key.replace('/', '_')}", best_by_key_info(experiment, key)) for key in knobs]
    return [(name, info) for name, info in curves + bests if info is not None]
