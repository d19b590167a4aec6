"""`sweep analyze`: tables, grids, plots, report.md and report.html for an experiment, from its files alone."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from optuna import load_study
from tqdm import tqdm

from diffusion_lib.atomic import atomic_write_text
from diffusion_lib.config import SEED_KEY, ConfigError
from diffusion_lib.milestone import CURVATURE, FID, FID_NUM_SAMPLES, FID_STDERR, STEP, TRAIN_LOSS, WALL_TIME
from record import storage
from record.best import is_finite_number
from record.experiment import Experiment, Trial, load_experiment
from record.files import ANALYSIS_DIR
from record.mirror import mirror_experiment

from . import plots
from .blocks import Block, BulletList, Code, Heading, Image, Paragraph, Table, to_html, to_markdown
from .curves import CurvatureCorrelation, FloorGap, GotWorse, curvature_correlation, floor_gap, got_worse
from .decisions import (
    NOISE_MULTIPLE,
    Configuration,
    RankAgreement,
    basis_warnings,
    configurations,
    effect_sentences,
    rank_agreement,
)
from .grids import denoising_diagnostic, sample_grid
from .study import MIN_TRIALS_TO_RANK, STUDY_FILE, parallel_coordinates, param_importances, write_optuna_study
from .tables import configurations_table, milestones_table, trials_table, write_table

TOP_K = 3
REPORT_FILE = "report.md"
# A sweep of a thousand trials stays readable: the report shows the best of them, the tables hold all.
TRIALS_SHOWN = 50
CONFIGURATIONS_SHOWN = 10
ERRORED_NAMED = 5  # trials named per distinct error


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ranked(experiment: Experiment) -> list[tuple[Trial, Optional[dict]]]:
    """Every trial with its best milestone, best first; a trial without a comparable one last."""
    metric, sign = experiment.metric, 1 if experiment.mode == "min" else -1
    scored = [(t, experiment.best(t)) for t in experiment.trials]
    return sorted(scored, key=lambda tb: (tb[1] is None, sign * tb[1][metric] if tb[1] else 0.0))


def analyze_experiment(
    path: Path, out_dir: Optional[Path] = None, top_k: int = TOP_K, *, progress: bool = False
) -> list[str]:
    """Write trials/milestones tables, grids, plots, report.md and report.html; return the
    warnings met. With `progress`, a progress bar over those stages (for a terminal)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such experiment directory")
    experiment = load_experiment(path)
    if not experiment.trials:
        raise ConfigError(f"{path}: no trials found (expected folders with metrics.jsonl or trial.json)")
    out = Path(out_dir) if out_dir else path / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    warnings = experiment.warnings
    metric = experiment.metric

    warnings += basis_warnings(experiment)
    configs = configurations(experiment)
    write_table(trials_table(experiment), out, "trials", arrow_too=True)
    write_table(milestones_table(experiment), out, "milestones")
    write_table(configurations_table(configs), out, "configurations")
    study = load_study(study_name=path.name, storage=f"sqlite:///{write_optuna_study(experiment, out / STUDY_FILE)}")
    importances, importance_trials = param_importances(experiment)
    bar = tqdm(total=3, desc="analysis", unit="stage", disable=not progress, leave=False)
    bar.update()  # tables and the study

    images: list[tuple[str, Path]] = []
    ranked = _ranked(experiment)
    with_checkpoint = [(t, experiment.best(t, checkpointed=True)) for t, _ in ranked]
    with_checkpoint = [(t, m) for t, m in with_checkpoint if m is not None]
    for trial, best in ranked:
        if best is not None and best[STEP.name] not in trial.checkpoints:
            warnings.append(
                f"{trial.trial_id}: no checkpoint for its best milestone (step {best['step']}); its grid uses the "
                "best one kept"
            )
    for rank, (trial, milestone) in enumerate(with_checkpoint[:top_k]):
        checkpoint = trial.checkpoints[milestone[STEP.name]]
        try:
            name = "best_grid.png" if rank == 0 else f"grid_rank{rank + 1}.png"
            sample_grid(checkpoint, out / name)
            images.append(
                (
                    f"{'Best' if rank == 0 else f'Rank {rank + 1}'}: {trial.label}, step {milestone['step']}, "
                    f"{metric} {_fmt(milestone[metric])}",
                    out / name,
                )
            )
            if rank == 0:
                denoising_diagnostic(checkpoint, out / "denoise.png")
                images.append(
                    (
                        "Denoising diagnostic of the best checkpoint: x0 | x_t | x̂0, rows t = 0, T/4, T/2, 3T/4, T−1",
                        out / "denoise.png",
                    )
                )
        except ConfigError as err:
            warnings.append(f"{trial.trial_id}: {err}")
    if not with_checkpoint:
        warnings.append(f"no trial has a checkpoint for a milestone with {metric}; no sample grids")
    bar.update()  # the sample grids

    figures = [
        plots.overlay(
            experiment,
            STEP.name,
            FID.name,
            "training step",
            "FID",
            "FID vs step (± standard error)",
            out / "fid_vs_step.png",
            count=FID_NUM_SAMPLES.name,
            band=FID_STDERR.name,
        ),
        plots.overlay(
            experiment,
            STEP.name,
            TRAIN_LOSS.name,
            "training step",
            "training loss",
            "Loss vs step",
            out / "loss_vs_step.png",
        ),
        plots.overlay(
            experiment,
            STEP.name,
            CURVATURE.name,
            "training step",
            "Hutchinson tr(H)",
            "Curvature vs step",
            out / "curvature_vs_step.png",
        ),
        plots.overlay(
            experiment,
            WALL_TIME.name,
            FID.name,
            "wall time (s)",
            "FID",
            "FID vs wall time (± standard error)",
            out / "fid_vs_wall_time.png",
            count=FID_NUM_SAMPLES.name,
            band=FID_STDERR.name,
        ),
        *[
            plots.best_by_key(experiment, key, out / f"best_by_{key.replace('/', '_')}.png")
            for key in experiment.searched_keys
            if key != SEED_KEY  # seeds are repeats, not a knob
        ],
        parallel_coordinates(study, out / "parallel_coordinates.png", metric),
    ]
    plot_images = [(p.stem.replace("_", " "), p) for p in figures if p is not None]
    bar.update()  # the plots
    bar.close()

    write_report(
        ReportData(
            experiment,
            ranked,
            plot_images + images,
            warnings,
            configs,
            importances,
            importance_trials,
            rank_agreement(experiment),
            floor_gap(experiment),
            [g for g in (got_worse(experiment, c) for c in configs[:CONFIGURATIONS_SHOWN]) if g is not None],
            [
                r
                for r in (curvature_correlation(experiment, c) for c in configs[:CONFIGURATIONS_SHOWN])
                if r is not None
            ],
        ),
        out,
    )
    return warnings


# --- The report: a list of sections, each a function returning blocks ------------------------
# report.md and report.html are both rendered from the one block list (analysis/blocks.py). To
# add a section, write `def _my_section(report: ReportData) -> list[Block]` and put it in SECTIONS
# (add a field to ReportData if it needs something computed in analyze_experiment).


@dataclass
class ReportData:
    """What the report's sections are built from."""

    experiment: Experiment
    ranked: list[tuple[Trial, Optional[dict]]]  # every trial with its best milestone, best first
    images: list[tuple[str, Path]]  # (caption, file): plots, then sample grids and diagnostics
    warnings: list[str]
    configurations: list[Configuration]  # seed repeats grouped, best mean first
    importances: dict[str, float]  # Optuna's importance of each searched key
    importance_trials: int  # finished and stopped trials the importances rest on
    rank_agreements: list[RankAgreement]
    floor: Optional[FloorGap]  # what real images score under the sweep's FID conditions
    got_worse: list[GotWorse]  # per configuration: its last FID against its best
    curvature: list[CurvatureCorrelation]  # per configuration: curvature against FID


def _summary_section(report: ReportData) -> list[Block]:
    experiment = report.experiment
    return [
        Heading(f"Sweep report: {experiment.path.name}", level=1),
        Paragraph(
            (
                f"{len(experiment.trials)} trials; metric ",
                Code(experiment.metric),
                f" ({experiment.mode}). Tables: ",
                Code("trials.parquet"),
                " / ",
                Code("trials.arrow"),
                ", ",
                Code("milestones.parquet"),
                ".",
            )
        ),
    ]


def _trials_section(report: ReportData) -> list[Block]:
    experiment = report.experiment
    metric, keys = experiment.metric, experiment.searched_keys
    header = [
        "trial",
        "state",
        *(k.split(".")[-1] for k in keys),
        f"best {metric}",
        "at step",
        "final train/loss",
        "wall time (s)",
    ]
    rows = []
    for trial, best in report.ranked[:TRIALS_SHOWN]:
        last = trial.milestones[-1] if trial.milestones else {}
        value = _fmt(best[metric] if best else None)
        if best is not None and metric == FID.name and is_finite_number(best.get(FID_STDERR.name)):
            value = f"{value} ± {best[FID_STDERR.name]:.2g}"
        rows.append(
            [
                trial.trial_id,
                trial.state,
                *(_fmt(trial.searched.get(k)) for k in keys),
                value,
                _fmt(best[STEP.name] if best else None),
                _fmt(last.get(TRAIN_LOSS.name)),
                _fmt(last.get(WALL_TIME.name)),
            ]
        )
    blocks: list[Block] = [Heading("Trials, best first"), Table(header, rows, id="trials")]
    if len(report.ranked) > TRIALS_SHOWN:
        more = len(report.ranked) - TRIALS_SHOWN
        blocks.append(Paragraph((f"The best {TRIALS_SHOWN}; {more} more in ", Code("trials.parquet"), ".")))
    by_error: dict[str, list[str]] = {}
    for trial in experiment.trials:
        if trial.error:
            by_error.setdefault(trial.error, []).append(trial.trial_id)
    if by_error:
        items = []
        for error, names in by_error.items():
            pieces: list[str] = []
            for name in names[:ERRORED_NAMED]:
                pieces += [", "] if pieces else []
                pieces.append(Code(name))
            more = f" and {len(names) - ERRORED_NAMED} more" if len(names) > ERRORED_NAMED else ""
            items.append((*pieces, f"{more}: {error}"))
        blocks.append(BulletList(items, intro="Errors (full tracebacks in each trial's error.txt):"))
    return blocks


def _configurations_section(report: ReportData) -> list[Block]:
    """Seed repeats grouped: mean ± sd of the same-count best FID across seeds."""
    configs = [c for c in report.configurations if c.best_fids]
    if not any(len(c.trials) > 1 for c in configs):
        return []
    keys = [k for k in report.experiment.searched_keys if k != SEED_KEY]
    rows = [
        [*(_fmt(c.searched.get(k)) for k in keys), str(len(c.best_fids)), _fmt(c.mean), _fmt(c.sd), _fmt(c.stderr)]
        for c in configs
    ]
    return [
        Heading("Configurations over seeds, best first"),
        Table(
            [*(k.split(".")[-1] for k in keys), "seeds", f"mean best {FID.name}", "sd", "standard error"],
            rows,
            id="configurations",
        ),
    ]


def _effects_section(report: ReportData) -> list[Block]:
    sentences = effect_sentences(report.configurations, report.experiment.searched_keys)
    rule = (
        f"A difference is called an effect when it exceeds {NOISE_MULTIPLE:g} standard errors of the gap; otherwise "
        "it is "
        "within noise. Each gap says its standard error: the seed spread (with repeats), the paired jackknife (two "
        "single-seed configurations sampled from the same noise: the noise they share cancels), or the two FIDs' own "
        "jackknife standard errors (sampling noise only)."
    )
    return [Heading("Effects"), Paragraph(rule), BulletList(sentences or ["Too few finished trials to compare."])]


def _floor_section(report: ReportData) -> list[Block]:
    if report.floor is None:
        return []
    return [
        Heading("How low can FID go here?"),
        Paragraph(
            report.floor.sentence
            + " The floor is the dashed line on the FID plots: no model can be expected to score below it at this "
            "sample count and reference, so read each FID as its distance above the floor."
        ),
    ]


def _over_training_section(report: ReportData) -> list[Block]:
    if not report.got_worse and not report.curvature:
        return []
    blocks: list[Block] = [Heading("Over training")]
    if len(report.configurations) > CONFIGURATIONS_SHOWN:
        blocks.append(Paragraph(f"The best {CONFIGURATIONS_SHOWN} of {len(report.configurations)} configurations."))
    if report.got_worse:
        blocks.append(BulletList([g.sentence for g in report.got_worse], intro="Did FID get worse after its best?"))
    if report.curvature:
        blocks.append(BulletList([c.sentence for c in report.curvature], intro="Does curvature track FID?"))
    return blocks


def _importance_section(report: ReportData) -> list[Block]:
    n = report.importance_trials
    if n < MIN_TRIALS_TO_RANK:
        text = (
            f"Too few trials to rank the searched keys: {n} with a {report.experiment.metric} on the common basis "
            f"(Optuna's PED-ANOVA needs at least {MIN_TRIALS_TO_RANK}: it weighs the top 10% against the rest). "
            "The effects above compare them with their noise."
        )
        return [Heading("Which knob matters"), Paragraph(text)]
    if not report.importances:
        return []
    ranked = ", ".join(f"{key} {share:.2f}" for key, share in report.importances.items())
    return [
        Heading("Which knob matters"),
        Paragraph(
            f"Optuna's PED-ANOVA importance of each searched key for {report.experiment.metric}, over {n} finished "
            f"and stopped trials, each at its best milestone (a ranking, not a test: with few trials it is a hint): "
            f"{ranked}."
        ),
    ]


def _early_stopping_section(report: ReportData) -> list[Block]:
    if not report.rank_agreements:
        return []
    return [Heading("Is early stopping safe here?"), BulletList([a.sentence for a in report.rank_agreements])]


def _figures_section(report: ReportData) -> list[Block]:
    return [Heading("Figures"), *[Image(caption, path) for caption, path in report.images]]


def _problems_section(report: ReportData) -> list[Block]:
    return [Heading("Problems met while analysing"), BulletList(report.warnings)] if report.warnings else []


SECTIONS: list[Callable[[ReportData], list[Block]]] = [
    _summary_section,
    _trials_section,
    _configurations_section,
    _effects_section,
    _floor_section,
    _over_training_section,
    _importance_section,
    _early_stopping_section,
    _figures_section,
    _problems_section,
]


def report_blocks(report: ReportData) -> list[Block]:
    """The sections' blocks, less any image whose file is missing (a plot with nothing to draw)."""
    blocks = [block for section in SECTIONS for block in section(report)]
    return [b for b in blocks if not (isinstance(b, Image) and not b.path.is_file())]


def write_report(report: ReportData, out: Path) -> None:
    """report.md (images linked, relative to `out`) and report.html (self-contained), both in `out`."""
    blocks = report_blocks(report)
    atomic_write_text(out / REPORT_FILE, to_markdown(blocks, out))
    atomic_write_text(out / "report.html", to_html(blocks))


# --- An experiment on cloud storage: analysed on a local mirror ------------------------------


def analyze_location(location: str, out: Optional[Path] = None, *, progress: bool = False) -> tuple[str, list[str]]:
    """`analyze_experiment` on an experiment at a local path or a URI; return where report.md
    is and the warnings (paths in them named as `location`, not the mirror). For a URI the
    experiment is mirrored into a temporary folder (small files, each trial's best checkpoint)
    and, without `out`, the analysis is uploaded to `location/analysis/`."""
    if not storage.is_uri(location):
        warnings = analyze_experiment(Path(location), out, progress=progress)
        return str((out or Path(location) / ANALYSIS_DIR) / REPORT_FILE), warnings
    storage.validate_storage(location, "EXPERIMENT")
    with tempfile.TemporaryDirectory(prefix="sweep-analyze-") as scratch:
        mirror = Path(scratch) / storage.name_of(location)  # the report is titled by the folder's name
        mirror_experiment(location, mirror, checkpoints=_best_checkpoints)
        warnings = [w.replace(str(mirror), location) for w in analyze_experiment(mirror, out, progress=progress)]
        if out is not None:
            return str(out / REPORT_FILE), warnings
        target = storage.join(location, ANALYSIS_DIR)
        storage.upload_tree(mirror / ANALYSIS_DIR, target)
        return storage.join(target, REPORT_FILE), warnings


def _best_checkpoints(mirror: Path) -> list[Path]:
    """Each trial's checkpoint of its best checkpointed milestone: the one a sample grid is drawn
    from, fetched without the other kept checkpoint (Ray keeps the newest too)."""
    experiment = load_experiment(mirror)
    bests = [(t, experiment.best(t, checkpointed=True)) for t in experiment.trials]
    return [t.checkpoints[best[STEP.name]] for t, best in bests if best is not None]
