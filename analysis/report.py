"""`sweep analyze`: tables, grids, plots, report.md and report.html for an experiment, from its files alone."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from tqdm import tqdm

from diffusion_lib.atomic import atomic_write_text
from diffusion_lib.config import SEED_KEY, ConfigError
from diffusion_lib.milestone import FID, FID_STDERR, STEP, TRAIN_LOSS, WALL_TIME
from record import storage
from record.best import is_finite_number
from record.experiment import Experiment, Trial, load_experiment, require_experiment
from record.files import ANALYSIS_DIR
from record.mirror import mirror_experiment
from record.noise import NOISE_MULTIPLE

from . import plots
from .blocks import Block, BulletList, Code, Heading, Image, Paragraph, Table, format_value, to_html, to_markdown
from .curves import CurvatureCorrelation, FloorGap, GotWorse, curvature_correlation, floor_gap, got_worse
from .decisions import (
    Configuration,
    RankAgreement,
    RankingMovement,
    basis_warnings,
    configurations,
    effect_sentences,
    rank_agreement,
    ranking_movements,
)
from .plot_info import Caption, figure_infos, ranked_trials, sample_grids_info
from .study import MIN_TRIALS_TO_RANK, STUDY_FILE, parallel_coordinates, param_importances, write_optuna_study
from .tables import configurations_table, milestones_table, trials_table, write_table

TOP_K = 3
REPORT_FILE = "report.md"
# A sweep of a thousand trials stays readable: the report shows the best of them, the tables hold all.
TRIALS_SHOWN = 50
CONFIGURATIONS_SHOWN = 10
ERRORED_NAMED = 5  # trials named per distinct error


def analyze_experiment(
    path: Path, out_dir: Optional[Path] = None, top_k: int = TOP_K, *, progress: bool = False
) -> list[str]:
    """Write trials/milestones tables, grids, plots, report.md and report.html; return the
    warnings met (the experiment's own, then the analysis's: a new list, the experiment is left
    as read). With `progress`, a progress bar over those stages (for a terminal)."""
    experiment = _load(Path(path))
    out = Path(out_dir) if out_dir else Path(path) / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc="analysis", unit="stage", disable=not progress, leave=False) as bar:
        configs = _write_tables(experiment, out)
        study = _write_study(experiment, out)
        importances, importance_trials = param_importances(experiment)
        bar.update()
        grids = sample_grids_info(experiment, top_k)
        grid_images, grid_errors = plots.draw_sample_grids(grids, out)
        bar.update()
        figures = _figures(experiment, study, out)
        bar.update()
    warnings = [*experiment.warnings, *basis_warnings(experiment), *grids.warnings, *grid_errors]
    report = ReportData(
        experiment=experiment,
        ranked=ranked_trials(experiment),
        images=figures + grid_images,
        warnings=warnings,
        configurations=configs,
        importances=importances,
        importance_trials=importance_trials,
        rank_agreements=rank_agreement(experiment),
        ranking_movements=ranking_movements(experiment),
        floor=floor_gap(experiment),
        got_worse=_found(got_worse, experiment, configs[:CONFIGURATIONS_SHOWN]),
        curvature=_found(curvature_correlation, experiment, configs[:CONFIGURATIONS_SHOWN]),
    )
    write_report(report, out)
    return warnings


def _load(path: Path) -> Experiment:
    experiment = load_experiment(path)
    if not experiment.trials:
        raise ConfigError(f"{path}: no trials found (expected folders with metrics.jsonl or trial.json)")
    return experiment


def _write_tables(experiment: Experiment, out: Path) -> list[Configuration]:
    """trials (Parquet and Arrow), milestones and configurations; return the configurations
    (seed repeats grouped, best first), which the report reads too."""
    configs = configurations(experiment)
    write_table(trials_table(experiment), out, "trials", arrow_too=True)
    write_table(milestones_table(experiment), out, "milestones")
    write_table(configurations_table(configs), out, "configurations")
    return configs


def _write_study(experiment: Experiment, out: Path) -> optuna.Study:
    """The sweep as an Optuna study in `out`, loaded back (the parallel-coordinates figure
    reads it)."""
    study_file = write_optuna_study(experiment, out / STUDY_FILE)
    return optuna.load_study(study_name=experiment.path.name, storage=f"sqlite:///{study_file}")


def _found(judge: Callable[[Experiment, Configuration], Any], experiment: Experiment, configs: list) -> list:
    """`judge`'s verdict on each configuration, leaving out those it has none for."""
    return [verdict for verdict in (judge(experiment, c) for c in configs) if verdict is not None]


def _figures(experiment: Experiment, study: optuna.Study, out: Path) -> list[Caption]:
    """Each figure with something to draw, captioned by its file name: those of
    `plot_info.figure_infos`, then Optuna's parallel coordinates (drawn by Optuna from the study)."""
    files = [plots.draw(info, out / f"{name}.png") for name, info in figure_infos(experiment)]
    files.append(parallel_coordinates(study, out / "parallel_coordinates.png", experiment.metric))
    return [(file.stem.replace("_", " "), file) for file in files if file is not None]


# --- The report: a list of sections, each a function returning blocks ------------------------
# report.md and report.html are both rendered from the one block list (analysis/blocks.py). To
# add a section, write `def _my_section(report: ReportData) -> list[Block]` and put it in SECTIONS
# (add a field to ReportData if it needs something computed in analyze_experiment).


@dataclass(kw_only=True)
class ReportData:
    """What the report's sections are built from (by keyword: eleven fields, several of one type)."""

    experiment: Experiment
    ranked: list[tuple[Trial, Optional[dict]]]  # every trial with its best milestone, best first
    images: list[Caption]  # plots, then sample grids and diagnostics
    warnings: list[str]
    configurations: list[Configuration]  # seed repeats grouped, best mean first
    importances: dict[str, float]  # Optuna's importance of each searched key
    importance_trials: int  # finished and stopped trials the importances rest on
    rank_agreements: list[RankAgreement]
    ranking_movements: list[RankingMovement]
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
        value = format_value(best[metric] if best else None)
        if best is not None and metric == FID.name and is_finite_number(best.get(FID_STDERR.name)):
            value = f"{value} ± {best[FID_STDERR.name]:.2g}"
        rows.append(
            [
                trial.trial_id,
                trial.state,
                *(format_value(trial.searched.get(k)) for k in keys),
                value,
                format_value(best[STEP.name] if best else None),
                format_value(last.get(TRAIN_LOSS.name)),
                format_value(last.get(WALL_TIME.name)),
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
        [
            *(format_value(c.searched.get(k)) for k in keys),
            str(len(c.best_fids)),
            format_value(c.mean),
            format_value(c.sd),
            format_value(c.stderr),
        ]
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
        f"A difference is called an effect when it exceeds {NOISE_MULTIPLE:g} standard errors of the gap; "
        "otherwise it is within noise. "
        "Each gap says its standard error: the seed spread (with repeats), "
        "the paired jackknife (two single-seed configurations sampled from the same noise: "
        "the noise they share cancels), "
        "or the two FIDs' own jackknife standard errors (sampling noise only)."
    )
    return [Heading("Effects"), Paragraph(rule), BulletList(sentences or ["Too few finished trials to compare."])]


def _floor_section(report: ReportData) -> list[Block]:
    if report.floor is None:
        return []
    return [
        Heading("How low can FID go here?"),
        Paragraph(
            f"{report.floor.sentence} The floor is the dashed line on the FID plots: "
            "no model can be expected to score below it at this sample count and reference, "
            "so read each FID as its distance above the floor."
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
        metric = report.experiment.metric
        text = (
            "Too few trials to rank the searched keys: "
            f"{n} with a {metric} on the common basis (Optuna's PED-ANOVA needs at least {MIN_TRIALS_TO_RANK}: "
            "it weighs the top 10% against the rest). "
            "The effects above compare them with their noise."
        )
        return [Heading("Which knob matters"), Paragraph(text)]
    if not report.importances:
        return []
    ranked = ", ".join(f"{key} {share:.2f}" for key, share in report.importances.items())
    return [
        Heading("Which knob matters"),
        Paragraph(
            f"Optuna's PED-ANOVA importance of each searched key for {report.experiment.metric}, "
            f"over {n} finished and stopped trials, "
            "each at its best milestone (a ranking, not a test: with few trials it is a hint): "
            f"{ranked}."
        ),
    ]


def _early_stopping_section(report: ReportData) -> list[Block]:
    sentences = [a.sentence for a in report.rank_agreements] + [m.sentence for m in report.ranking_movements]
    return [Heading("Is early stopping safe here?"), BulletList(sentences)] if sentences else []


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
    experiment is mirrored into a temporary folder (small files, the best trials' recorded sample
    grids and the checkpoint the denoising diagnostic is drawn from) and, without `out`, the
    analysis is uploaded to `location/analysis/`."""
    require_experiment(location)
    mirror = functools.partial(mirror_experiment, fetch=_files_for_the_images)
    with storage.local_folder(location, seed=mirror, upload_changes=out is None) as folder:
        warnings = list(map(storage.named_as(location, folder), analyze_experiment(folder, out, progress=progress)))
    return storage.join(str(out) if out else storage.join(location, ANALYSIS_DIR), REPORT_FILE), warnings


def _files_for_the_images(mirror: Path) -> list[Path]:
    """The files the report's sample grids and denoising diagnostic come from, fetched without
    the rest: the top trials' recorded grids of their best milestones (not every milestone's),
    and one checkpoint (not each trial's newest and best)."""
    info = sample_grids_info(load_experiment(mirror), TOP_K)
    return [grid.recorded for grid in info.grids] + ([info.denoise.checkpoint] if info.denoise else [])
