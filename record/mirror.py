"""Local mirrors of an experiment on cloud storage, for the readers that read local files
(`sweep status`, `sweep analyze`): which files a mirror copies, and bringing one up to date."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from diffusion_lib.config import ConfigError
from diffusion_lib.run_files import CHECKPOINT_DIR, CHECKPOINT_GLOB, FLOOR_FILE, METRICS_FILE, SAMPLES_DIR

from .files import (
    ANALYSIS_DIR,
    DRIVER_ENDED_FILE,
    DRIVER_LOCK_FILE,
    INTERRUPTED_FILE,
    RAY_CHECKPOINT_GLOB,
    RAY_ERROR_FILE,
    RAY_STATE_GLOB,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRIAL_FILE,
)
from .storage import fetch_all, resolve, set_mtime

# What each file of the experiment is to a mirror, by its path relative to the experiment.
SMALL, CHECKPOINT, SAMPLE_GRID, SKIP = "small", "checkpoint", "sample_grid", "skip"


def experiment_file_kind(parts: tuple[str, ...]) -> str:
    """SMALL: what analysis and status read (sweep.json, the summary or the Ctrl-C record, the
    driver lock, the FID floor, Ray's experiment state, each trial's trial.json, metrics.jsonl
    and error.txt);
    CHECKPOINT: a trainer checkpoint in a Ray `checkpoint_*/` (or `sweep train`'s `checkpoints/`)
    folder; SAMPLE_GRID: a milestone's sample grid in a run's `samples/` folder (the report
    shows the best milestones'); SKIP: the rest (TensorBoard events, the FID reference, Ray's own
    files, earlier analyses)."""
    name = parts[-1]
    per_run = (TRIAL_FILE, METRICS_FILE, RAY_ERROR_FILE)
    experiments_own = (SWEEP_FILE, SUMMARY_FILE, INTERRUPTED_FILE, DRIVER_LOCK_FILE, DRIVER_ENDED_FILE, FLOOR_FILE)
    if len(parts) == 1:
        return SMALL if name in (*experiments_own, *per_run) or fnmatch.fnmatch(name, RAY_STATE_GLOB) else SKIP
    if len(parts) == 2 and name in per_run and parts[0] != ANALYSIS_DIR:
        return SMALL
    if (
        fnmatch.fnmatch(name, CHECKPOINT_GLOB)
        and len(parts) in (2, 3)
        and (fnmatch.fnmatch(parts[-2], RAY_CHECKPOINT_GLOB) or parts[-2] == CHECKPOINT_DIR)
    ):
        return CHECKPOINT
    if len(parts) in (2, 3) and parts[-2] == SAMPLES_DIR:
        return SAMPLE_GRID
    return SKIP


def mirror_experiment(
    location: str, local_dir: str | os.PathLike, *, fetch: Optional[Callable[[Path], Iterable[Path]]] = None
) -> Path:
    """Bring the experiment at `location` (a URI) into `local_dir`, or bring an existing mirror up
    to date: the SMALL files, each with its object's time as its mtime (what `sweep status`
    judges freshness by), files gone from the storage removed. Checkpoints and sample grids are
    left out unless `fetch` is given: then each checkpoint appears as an empty placeholder (so a
    reader sees which steps were kept), and the checkpoints and sample grids `fetch(local_dir)`
    names (called once the SMALL files and placeholders are in place) are downloaded for real.
    Raises ConfigError when nothing is stored there."""
    import pyarrow.fs

    local_dir = Path(local_dir)
    fs, root = resolve(location)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise ConfigError(f"{location}: cannot list the experiment: {type(err).__name__}: {err}") from None
    files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
    if not files:
        raise ConfigError(f"{location}: no such experiment (nothing is stored there)")

    wanted: dict[Path, tuple[str, object]] = {}
    for info in files:
        parts = tuple(p for p in info.path[len(root) :].split("/") if p)
        kind = experiment_file_kind(parts)
        if kind == SMALL or (kind in (CHECKPOINT, SAMPLE_GRID) and fetch is not None):
            wanted[local_dir.joinpath(*parts)] = (kind, info)

    def stale(local: Path, info) -> bool:
        try:
            stat = local.stat()
        except FileNotFoundError:
            return True
        return stat.st_size != info.size or (
            info.mtime is not None and abs(stat.st_mtime - info.mtime.timestamp()) > 1e-3
        )

    small = [(local, info) for local, (kind, info) in wanted.items() if kind == SMALL and stale(local, info)]
    fetch_all(fs, small)
    for local, (kind, info) in wanted.items():  # placeholders: empty, the object's time
        if kind == CHECKPOINT and not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
            set_mtime(local, info)
    if fetch is not None:
        chosen = {Path(p) for p in fetch(local_dir)}
        fetch_all(fs, [(local, info) for local, (_, info) in wanted.items() if local in chosen and stale(local, info)])
    for local in [p for p in local_dir.rglob("*") if p.is_file()]:  # gone from the storage
        if local not in wanted and experiment_file_kind(local.relative_to(local_dir).parts) != SKIP:
            local.unlink(missing_ok=True)
    return local_dir
