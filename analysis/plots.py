"""Drawing the report's images (the research notes' figures, the denoising diagnostic; the sample
grids are copied) from their info objects: what an image shows is decided in
`analysis/plot_info.py`; here it is only drawn and saved as a PNG."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion_lib.atomic import atomic_path  # noqa: E402
from diffusion_lib.config import ConfigError  # noqa: E402

from .grids import denoising_diagnostic  # noqa: E402
from .plot_info import (  # noqa: E402
    DENOISE_FILE,
    BestByKeyInfo,
    Caption,
    CurvesInfo,
    FigureInfo,
    FloorBand,
    SampleGridsInfo,
    best_points,
)

# best_points: tests/test_record.py reads it from here.
__all__ = ["draw", "draw_curves", "draw_best_by_key", "draw_floor", "draw_sample_grids", "best_points"]


def draw(info: FigureInfo, path: Path) -> Path:
    """The figure `info` describes, written to `path` (a PNG, atomically)."""
    return DRAWERS[type(info)](info, path)


def draw_curves(info: CurvesInfo, path: Path) -> Path:
    """One line per curve: the coloured ones with markers and their ± one-standard-error band,
    the grey ones thin and under them."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in info.curves:
        xs, ys, stderrs = (np.array(column, dtype=float) for column in (curve.xs, curve.ys, curve.stderrs))
        if not curve.coloured:
            ax.plot(xs, ys, color="0.75", linewidth=0.6, zorder=1, label=curve.label)
            continue
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=curve.label, zorder=3)
        if np.isfinite(stderrs).any():
            ax.fill_between(xs, ys - stderrs, ys + stderrs, color=line.get_color(), alpha=0.2, linewidth=0, zorder=2)
    ax.set(xlabel=info.xlabel, ylabel=info.ylabel, title=info.title)
    if info.floor is not None:
        draw_floor(ax, info.floor)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def draw_best_by_key(info: BestByKeyInfo, path: Path) -> Path:
    """A scatter of each trial's best metric against the key's value (or category)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(info.xs, info.ys)
    if info.log_x:
        ax.set_xscale("log")
    if info.categories is not None:
        ax.set_xticks(range(len(info.categories)), info.categories)
    ax.set(xlabel=info.xlabel, ylabel=info.ylabel, title=info.title)
    if info.floor is not None:
        draw_floor(ax, info.floor)
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def draw_floor(ax, floor: FloorBand) -> None:
    """The FID floor as a dashed horizontal line with its ± one-standard-error band."""
    ax.axhline(floor.fid, color="black", linestyle="--", linewidth=1, label=floor.label)
    ax.axhspan(floor.fid - floor.stderr, floor.fid + floor.stderr, color="black", alpha=0.1, linewidth=0)


def draw_sample_grids(info: SampleGridsInfo, out: Path) -> tuple[list[Caption], list[str]]:
    """Each top trial's recorded grid copied into `out`, then the denoising diagnostic drawn from
    its checkpoint, as (caption, file). A recorded grid that is missing, or a checkpoint that
    cannot be read, is a warning and no image, not the end of the analysis."""
    images: list[Caption] = []
    warnings: list[str] = []
    for grid in info.grids:
        if not grid.recorded.is_file():
            warnings.append(f"{grid.trial_id}: no sample grid for its best milestone ({grid.recorded} is missing)")
            continue
        with atomic_path(out / grid.file) as tmp:
            shutil.copyfile(grid.recorded, tmp)
        images.append((grid.caption, out / grid.file))
    if info.denoise is not None:
        try:
            denoising_diagnostic(info.denoise.checkpoint, out / DENOISE_FILE)
            images.append((info.denoise.caption, out / DENOISE_FILE))
        except ConfigError as err:
            warnings.append(f"{info.denoise.trial_id}: {err}")
    return images, warnings


DRAWERS: dict[type, Callable[..., Path]] = {CurvesInfo: draw_curves, BestByKeyInfo: draw_best_by_key}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
