"""`sweep analyze`: tables, grids, plots and report.md for an experiment, from its files alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from diffusion_lib.atomic import atomic_write_text
from diffusion_lib.config import ConfigError

from . import plots
from .experiment import Experiment, Trial, load_experiment
from .grids import denoising_diagnostic, sample_grid
from .tables import milestones_table, trials_table, write_table
from diffusion_lib.milestone import CURVATURE, FID, FID_NUM_SAMPLES, STEP, TRAIN_LOSS, WALL_TIME

TOP_K = 3


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def effect_sentences(experiment: Experiment) -> list[str]:
    """One sentence per searched key: how the best metric moves with it, computed from the table."""
    metric, better = experiment.metric, (min if experiment.mode == "min" else max)
    sentences = []
    for key in experiment.searched_keys:
        by_value: dict[Any, float] = {}
        for trial in experiment.trials:
            best = trial.best_milestone(metric, experiment.mode)
            if best is not None and key in trial.searched:
                value = trial.searched[key]
                by_value[value] = better(by_value.get(value, best[metric]), best[metric])
        if len(by_value) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in by_value)
        values = sorted(by_value, key=lambda v: v if numeric else str(v))
        name = key.split(".")[-1]
        if len(values) == 2:
            a, b = by_value[values[0]], by_value[values[1]]
            verb = "falls" if b < a else "rises" if b > a else "stays"
            sentences.append(f"Best {metric} {verb} from {_fmt(a)} to {_fmt(b)} as {name} goes {_fmt(values[0])} → {_fmt(values[1])}.")
        else:
            listing = ", ".join(f"{_fmt(v)}: {_fmt(by_value[v])}" for v in values)
            winner = better(values, key=lambda v: by_value[v])
            sentences.append(f"Best {metric} by {name}: {listing}; the best is at {name} = {_fmt(winner)}.")
    return sentences


def _ranked(experiment: Experiment) -> list[tuple[Trial, Optional[dict]]]:
    metric, mode = experiment.metric, experiment.mode
    scored = [(t, t.best_milestone(metric, mode)) for t in experiment.trials]
    sign = 1 if mode == "min" else -1
    return sorted(scored, key=lambda tb: (tb[1] is None, sign * tb[1][metric] if tb[1] else 0.0))


def analyze_experiment(path: Path, out_dir: Optional[Path] = None, top_k: int = TOP_K) -> list[str]:
    """Write trials/milestones tables, grids, plots and report.md; return the warnings met."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such experiment directory")
    experiment = load_experiment(path)
    if not experiment.trials:
        raise ConfigError(f"{path}: no trials found (expected folders with metrics.jsonl or trial.json)")
    out = Path(out_dir) if out_dir else path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    warnings = experiment.warnings
    metric = experiment.metric

    write_table(trials_table(experiment), out, "trials", arrow_too=True)
    write_table(milestones_table(experiment), out, "milestones")

    images: list[tuple[str, Path]] = []
    ranked = _ranked(experiment)
    with_checkpoint = [(t, t.best_milestone(metric, experiment.mode, checkpointed=True)) for t, _ in ranked]
    with_checkpoint = [(t, m) for t, m in with_checkpoint if m is not None]
    for trial, best in ranked:
        if best is not None and best[STEP.name] not in trial.checkpoints:
            warnings.append(f"{trial.trial_id}: no checkpoint for its best milestone (step {best['step']}); its grid uses the best one kept")
    for rank, (trial, milestone) in enumerate(with_checkpoint[:top_k]):
        checkpoint = trial.checkpoints[milestone[STEP.name]]
        try:
            name = "best_grid.png" if rank == 0 else f"grid_rank{rank + 1}.png"
            sample_grid(checkpoint, out / name)
            images.append((f"{'Best' if rank == 0 else f'Rank {rank + 1}'}: {trial.label}, step {milestone['step']}, {metric} {_fmt(milestone[metric])}", out / name))
            if rank == 0:
                denoising_diagnostic(checkpoint, out / "denoise.png")
                images.append(("Denoising diagnostic of the best checkpoint: x0 | x_t | x̂0, rows t = 0, T/4, T/2, 3T/4, T−1", out / "denoise.png"))
        except ConfigError as err:
            warnings.append(f"{trial.trial_id}: {err}")
    if not with_checkpoint:
        warnings.append(f"no trial has a checkpoint for a milestone with {metric}; no sample grids")

    figures = [
        plots.overlay(experiment, STEP.name, FID.name, "training step", "FID", "FID vs step", out / "fid_vs_step.png", count=FID_NUM_SAMPLES.name),
        plots.overlay(experiment, STEP.name, TRAIN_LOSS.name, "training step", "training loss", "Loss vs step", out / "loss_vs_step.png"),
        plots.overlay(experiment, STEP.name, CURVATURE.name, "training step", "Hutchinson tr(H)", "Curvature vs step", out / "curvature_vs_step.png"),
        plots.overlay(experiment, WALL_TIME.name, FID.name, "wall time (s)", "FID", "FID vs wall time", out / "fid_vs_wall_time.png", count=FID_NUM_SAMPLES.name),
        *[plots.best_by_key(experiment, key, out / f"best_by_{key.replace('/', '_')}.png") for key in experiment.searched_keys],
    ]
    plot_images = [(p.stem.replace("_", " "), p) for p in figures if p is not None]

    atomic_write_text(out / "report.md", render_report(experiment, ranked, plot_images + images, warnings, out))
    return warnings


def render_report(experiment, ranked, images, warnings, out: Path) -> str:
    metric, keys = experiment.metric, experiment.searched_keys
    lines = [
        f"# Sweep report: {experiment.path.name}",
        "",
        f"{len(experiment.trials)} trials; metric `{metric}` ({experiment.mode}). "
        "Tables: `trials.parquet` / `trials.arrow`, `milestones.parquet`.",
        "",
        "## Trials, best first",
        "",
        "| trial | status | " + " | ".join(k.split(".")[-1] for k in keys) + f" | best {metric} | at step | final train/loss | wall time (s) |",
        "|" + "---|" * (len(keys) + 6),
    ]
    for trial, best in ranked:
        last = trial.milestones[-1] if trial.milestones else {}
        cells = [trial.trial_id, trial.status, *(_fmt(trial.searched.get(k)) for k in keys),
                 _fmt(best[metric] if best else None), _fmt(best[STEP.name] if best else None),
                 _fmt(last.get(TRAIN_LOSS.name)), _fmt(last.get(WALL_TIME.name))]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [t for t in experiment.trials if t.error]
    if errors:
        lines += ["", "Errors (full tracebacks in each trial's error.txt):", *[f"- `{t.trial_id}`: {t.error}" for t in errors]]
    lines += ["", "## Effects", ""]
    lines += [f"- {s}" for s in effect_sentences(experiment)] or ["- Too few finished trials to compare."]
    lines += ["", "## Figures", ""]
    for caption, path in images:
        if path.is_file():
            lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(out).as_posix()})", ""]
    if warnings:
        lines += ["## Problems met while analysing", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"
