"""The `sweep` command line: train one run, run a search, compute FID, analyse an experiment.

Bad input is one line naming what is wrong, exit code 2, before any expensive work starts:
modules that load torch or Ray are imported inside the commands, once their input is checked.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from analysis.status import show_status
from cli.lines import note
from cli.sweep_end import end_of_sweep
from diffusion_lib.config import ConfigError, load_config
from record.driver_lock import refuse_if_driven
from record.experiment import require_experiment
from record.noise import DEFAULT_CUT_Z
from sweeps.console import one_line_warnings
from sweeps.resume_plan import resume_plan

one_line_warnings()
# Plain help: typer's rich panels label every flag `<bool>`, as if it took a value.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help=__doc__.split("\n")[0])

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.batch_size=128 (repeatable).")


def exits_2_on_bad_input(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            note(f"error: {err}")
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@exits_2_on_bad_input
def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    out: Path = typer.Option(..., "--out", help="Run directory; run again on it to resume."),
    set_: Optional[List[str]] = SetOption,
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train one model: TensorBoard events, metrics.jsonl, sample grids and checkpoints in OUT."""
    run_config = load_config(config, set_)  # bad input is refused here, before torch loads
    from diffusion_lib.single_run import train_single_run

    typer.echo(json.dumps(train_single_run(run_config, out, progress=progress and sys.stderr.isatty(), say=note)))


WeightsOption = typer.Option(
    None, "--weights", help="pytorch-fid Inception weights file (default: $SWEEP_FID_WEIGHTS or download)."
)


@app.command()
@exits_2_on_bad_input
def fid(
    source_a: Path = typer.Argument(..., help="Image folder or .npz statistics."),
    source_b: Path = typer.Argument(..., help="Image folder or .npz statistics."),
    weights: Optional[str] = WeightsOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(200, help="Inception batch size."),
):
    """Print the FID between two sources, like `python -m pytorch_fid A B` (the same number, by
    the exact symmetric-eigenvalue route instead of scipy's general matrix square root), with its
    jackknife standard error over B's images when B is a folder (statistics files hold no images)."""
    for source in (source_a, source_b):
        if not source.exists():
            raise ConfigError(f"{source}: no such folder or file")
    from diffusion_lib.fid_between import fid_between

    result = fid_between(
        source_a, source_b, weights=weights, device=device, batch_size=batch_size, progress=sys.stderr.isatty()
    )
    typer.echo(result.line)
    if result.warning:
        note(f"warning: {result.warning}")


@app.command("fid-stats")
@exits_2_on_bad_input
def fid_stats(
    source: Path = typer.Argument(..., help="Image folder."),
    out: Path = typer.Option(..., "--out", help="Where to write the .npz (pytorch-fid's format)."),
    weights: Optional[str] = WeightsOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(200, help="Inception batch size."),
):
    """Save the Inception statistics (mu, sigma) of an image folder."""
    if not source.is_dir():
        raise ConfigError(f"{source}: not an image folder")
    from diffusion_lib.fid_between import inception_features
    from diffusion_lib.metrics.fid import FeatureStats, features_of_images, load_image_folder

    images = load_image_folder(source)  # too few images are refused before the Inception network loads
    features = inception_features(weights, device, batch_size, progress=sys.stderr.isatty())
    stats = FeatureStats.from_features(features_of_images(images, features))
    stats.save(out)
    typer.echo(f"wrote {out} ({stats.num_images} images)")


@app.command()
@exits_2_on_bad_input
def run(
    spec_path: Path = typer.Argument(
        ..., metavar="SPEC", help="Search-space file (YAML), e.g. search_spaces/smoke.yaml."
    ),
    name: Optional[str] = typer.Option(None, help="Experiment name (default: the spec's, else its file name)."),
    storage: Optional[str] = typer.Option(None, help="Where experiments live: a local path or a URI Ray Tune accepts."),
    set_: Optional[List[str]] = SetOption,
    address: Optional[str] = typer.Option(None, help="Attach to a running Ray cluster (also $RAY_ADDRESS)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted experiment."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the trial list; start nothing."),
    analyze_after: bool = typer.Option(
        True, "--analyze/--no-analyze", help="Write tables, plots and report.md at the end."
    ),
):
    """Run a grid, random or Optuna search with Ray Tune; resume it with --resume."""
    from sweeps.spec import load_spec

    spec = load_spec(spec_path, set_, name=name, storage=storage)  # bad input is refused here, before torch and Ray
    if not dry_run:
        refuse_if_driven(spec.storage, spec.experiment_path)  # said now, not after loading torch and Ray
    if dry_run and resume:
        typer.echo("\n".join(resume_plan(spec.experiment_path, spec.num_trials)))
        return
    from sweeps.describe import describe, dry_run_warnings

    typer.echo(describe(spec))
    warnings = spec.warnings() + (dry_run_warnings(spec, address or os.environ.get("RAY_ADDRESS")) if dry_run else [])
    for warning in warnings:
        note(f"warning: {warning}")
    if dry_run:
        return
    from sweeps.runner import NoSpaceLeft, SweepInterrupted, run_sweep

    try:
        results = run_sweep(spec, address=address, resume=resume, say=note)
    except SweepInterrupted as interrupted:
        note(str(interrupted))
        raise typer.Exit(code=interrupted.exit_code) from None
    except NoSpaceLeft as full:
        note(f"error: {full}")
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=end_of_sweep(spec, results, analyze=analyze_after))


@app.command()
@exits_2_on_bad_input
def analyze(
    experiment_dir: str = typer.Argument(
        ..., metavar="EXPERIMENT", help="An experiment directory (storage/name), or its URI (s3://bucket/prefix/name)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: EXPERIMENT/analysis, uploaded there for a URI)."
    ),
):
    """Tables (Parquet/Arrow), sample grids, plots and report.md from an experiment's files.

    For a URI the files analysis reads (and each trial's best checkpoint, for the sample grids)
    are copied to a temporary local mirror first."""
    require_experiment(experiment_dir)  # before the analysis loads torch
    from analysis.report import analyze_location

    note(f"analysing {experiment_dir}: tables, the study, sample grids, plots and the report")
    report, warnings = analyze_location(experiment_dir, out, progress=sys.stderr.isatty())
    for warning in warnings:
        note(f"warning: {warning}")
    typer.echo(f"wrote {report}")


@app.command()
@exits_2_on_bad_input
def replay(
    experiment_dir: Path = typer.Argument(..., metavar="EXPERIMENT", help="A finished grid's experiment directory."),
    grace_period: Optional[int] = typer.Option(None, help="First rung, in steps (default: the first milestone)."),
    reduction_factor: float = typer.Option(2.0, min=1.0, help="Keep 1/reduction_factor of the trials at each rung."),
    z: float = typer.Option(DEFAULT_CUT_Z, min=0.0, help="Racing: stop only beyond this many standard errors."),
    concurrency: int = typer.Option(2, min=1, help="Trials running at once."),
    orders: int = typer.Option(200, min=1, help="Random arrival orders."),
    seed: int = typer.Option(0, help="Seed of the orders and speeds."),
):
    """Would early stopping have kept this grid's best, and what would it have saved? Replays the
    recorded FID curves through ASHA, racing and racing_dynamics in many arrival orders (no training)."""
    from sweeps.replay import render, replay_experiment

    info = replay_experiment(
        experiment_dir,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        z=z,
        concurrency=concurrency,
        orders=orders,
        seed=seed,
    )
    typer.echo("\n".join(render(info)))


@app.command()
@exits_2_on_bad_input
def status(
    experiment_dir: str = typer.Argument(
        ..., metavar="EXPERIMENT", help="An experiment directory (storage/name), or its URI (s3://bucket/prefix/name)."
    ),
    watch: bool = typer.Option(False, "--watch", help="Refresh every --interval seconds until Ctrl-C."),
    interval: float = typer.Option(10.0, "--interval", min=0.1, help="Seconds between refreshes with --watch."),
):
    """Each trial's status, step, latest and best FID and wall time, read from files only (no Ray):
    works while the sweep runs, after it ended or was killed, from any machine seeing the storage.

    For a URI the small files status reads (no checkpoints) are mirrored locally, each with its
    object's time, and brought up to date before every refresh."""
    show_status(
        experiment_dir,
        watching=watch,
        interval=interval,
        echo=typer.echo,
        warn=note,
        clear=watch and sys.stdout.isatty(),
    )
