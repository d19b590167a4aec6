"""Overlay plots, one line per trial labelled by its searched values (the research notes' figures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion_lib.atomic import atomic_path  # noqa: E402
from diffusion_lib.milestone import FID  # noqa: E402
from record.best import is_finite_number  # noqa: E402
from record.experiment import Experiment, Trial  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def overlay(
    experiment: Experiment,
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    *,
    count: Optional[str] = None,
    band: Optional[str] = None,
) -> Optional[Path]:
    """Lines of `y` against `x` for every trial that reported `y`; None when none did. With
    `count` (e.g. `val/fid_num_samples`), points measured at different counts are never joined:
    each count is its own line, labelled with it. With `band` (e.g. `val/fid_stderr`), each line
    carries a shaded ± one-standard-error band. An FID plot also draws the experiment's FID floor.
    Beyond COLOURED trials, the best COLOURED (by the sweep's metric) are drawn in colour and
    labelled, the others as thin grey lines under one legend entry: a legend that fits."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    coloured = set(_best_trial_ids(experiment, COLOURED))
    drawn, greyed = 0, 0
    for trial in experiment.trials:
        lines: dict[Any, list[tuple[float, float, float]]] = {}
        for r in trial.milestones:
            if is_finite_number(r.get(x)) and is_finite_number(r.get(y)):
                se = r.get(band) if band and is_finite_number(r.get(band)) else math.nan
                lines.setdefault(r.get(count) if count else None, []).append((r[x], r[y], se))
        for n, points in lines.items():
            xs, ys, ses = (np.array(column, dtype=float) for column in zip(*points))
            if trial.trial_id not in coloured:
                label = f"{len(experiment.trials) - len(coloured)} other trials" if not greyed else None
                ax.plot(xs, ys, color="0.75", linewidth=0.6, zorder=1, label=label)
                greyed += 1
                continue
            label = trial.label if len(lines) == 1 else f"{trial.label} (N={n})"
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label, zorder=3)
            if np.isfinite(ses).any():
                ax.fill_between(xs, ys - ses, ys + ses, color=line.get_color(), alpha=0.2, linewidth=0, zorder=2)
            drawn += 1
    if not drawn and not greyed:
        plt.close(fig)
        return None
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if y == FID.name:
        draw_floor(experiment, ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


COLOURED = 10


def _best_trial_ids(experiment: Experiment, k: int) -> list[str]:
    """The k best trials by the sweep's metric (all of them when there are k or fewer)."""
    if len(experiment.trials) <= k:
        return [t.trial_id for t in experiment.trials]
    sign = 1 if experiment.mode == "min" else -1
    scored = [(t, experiment.best(t)) for t in experiment.trials]
    ranked = sorted((b[experiment.metric] * sign, t.trial_id) for t, b in scored if b is not None)
    return [trial_id for _, trial_id in ranked[:k]]


def draw_floor(experiment: Experiment, ax) -> None:
    """The FID floor as a horizontal line with its ± one-standard-error band, when there is one
    for the experiment's common FID basis."""
    point = experiment.floor_point()
    if point is None or point.fid is None:
        return
    ax.axhline(point.fid, color="black", linestyle="--", linewidth=1, label=f"real images (N={point.num_samples})")
    ax.axhspan(point.fid - point.stderr, point.fid + point.stderr, color="black", alpha=0.1, linewidth=0)


def best_points(experiment: Experiment, key: str) -> list[tuple[Trial, dict[str, Any]]]:
    """Each trial that searched `key`, with its best milestone (on the common FID basis)."""
    bests = [(trial, experiment.best(trial)) for trial in experiment.trials if key in trial.searched]
    return [(trial, best) for trial, best in bests if best is not None]


def best_by_key(experiment: Experiment, key: str, path: Path) -> Optional[Path]:
    """Best metric per trial against one searched key: categorical keys on a category axis, a
    key searched on a log scale (loguniform) on a log axis; None when the key took one value."""
    points = [(trial.searched[key], best[experiment.metric]) for trial, best in best_points(experiment, key)]
    if len({str(p[0]) for p in points}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [p[0] for p in points]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        ax.scatter(values, [p[1] for p in points])
        if experiment.searched_on_log_scale(key):
            ax.set_xscale("log")
    else:
        categories = sorted({str(v) for v in values})
        ax.scatter([categories.index(str(v)) for v in values], [p[1] for p in points])
        ax.set_xticks(range(len(categories)), categories)
    ax.set(xlabel=key, ylabel=f"best {experiment.metric}", title=f"best {experiment.metric} by {key}")
    if experiment.metric == FID.name and experiment.floor_point():
        draw_floor(experiment, ax)
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)
