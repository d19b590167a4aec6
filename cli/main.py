"""The `sweep` command line: train one run, run a search, compute FID, analyse an experiment.

Bad input (config, spec, data, checkpoint) is reported in one line naming what is wrong,
with exit code 2, before any expensive work starts.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from diffusion_lib.config import SEED_KEY, ConfigError, fid_weights
from sweeps.console import one_line_warnings

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
            typer.echo(f"error: {err}", err=True)
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
    from diffusion_lib.build import create_trainer
    from diffusion_lib.config import load_config
    from diffusion_lib.metrics.fid import fid_floor
    from diffusion_lib.run_log import write_hparams_config, write_session_end

    run_config = load_config(config, set_)
    trainer = create_trainer(run_config, out, progress=progress and sys.stderr.isatty())
    if run_config.fid.enabled and not run_config.fid.reference:  # a reference of the user's holds unknown images
        floor = fid_floor(run_config, trainer.data, trainer.features, trainer.fid_reference, out)
        for point in floor.points:
            typer.echo(f"FID floor: {floor.sentence(point.num_samples)}", err=True)
    if trainer.step:
        typer.echo(f"resuming {out} from step {trainer.step}", err=True)
    else:
        write_hparams_config(out, list(run_config.flat()))
    try:
        summary = trainer.fit()
    except Exception:  # TensorBoard's HParams Status: Failure (a Ctrl-C leaves it Unknown, to resume)
        write_session_end(out, succeeded=False)
        raise
    write_session_end(out, succeeded=True)
    typer.echo(json.dumps(summary))


def _features(weights: Optional[str], device: str, batch_size: int):
    from diffusion_lib.build import resolve_device
    from diffusion_lib.metrics.fid import InceptionFeatures

    return InceptionFeatures(fid_weights(weights)[0], resolve_device(device), batch_size, progress=sys.stderr.isatty())


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
    from diffusion_lib.metrics.fid import (
        FEATURE_DIMS,
        FID_JACKKNIFE_GROUPS,
        features_of_folder,
        small_sample_note,
        stats_of_source,
    )
    from diffusion_lib.metrics.frechet import FrechetReference, fid_jackknife

    for source in (source_a, source_b):
        if not source.exists():
            raise ConfigError(f"{source}: no such folder or file")
    # Two .npz files are statistics already: no Inception network to load.
    folders = [s for s in (source_a, source_b) if s.suffix != ".npz"]
    features = _features(weights, device, batch_size) if folders else None
    a = stats_of_source(source_a, features)
    reference = FrechetReference.from_stats(a.mu, a.sigma)
    if source_b.suffix == ".npz":
        b = stats_of_source(source_b, features)
        value, stderr, count = reference.fid_from_stats(b.mu, b.sigma), None, b.num_images
    else:
        b_features = features_of_folder(source_b, features)
        count = b_features.shape[0]
        value = reference.fid(b_features)
        groups = min(FID_JACKKNIFE_GROUPS, count - 2)
        stderr = fid_jackknife(reference, b_features, num_groups=groups).stderr if count >= 4 else None
    spread = f" ± {stderr:.2g}" if stderr is not None else ""

    def described(num_images: int, source: Path) -> str:  # a statistics file may not record its count
        return f"{num_images} images of {source.name}" if num_images > 0 else source.name

    typer.echo(f"FID: {value:.6g}{spread} ({described(count, source_b)} against {described(a.num_images, source_a)})")
    if 0 < count < FEATURE_DIMS:
        typer.echo(f"warning: {small_sample_note(count)}", err=True)


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
    from diffusion_lib.metrics.fid import stats_of_source

    if not source.is_dir():
        raise ConfigError(f"{source}: not an image folder")
    stats = stats_of_source(source, _features(weights, device, batch_size))
    stats.save(out)
    typer.echo(f"wrote {out} ({stats.num_images} images)")


def describe(spec) -> str:
    """The expanded trial list `--dry-run` prints, ending with the line `N trials`."""
    from record.states import trial_count
    from sweeps.spec import short_params

    scheduler = spec.scheduler
    rule = f", stops only beyond {scheduler.z:g} standard errors" if scheduler.type == "racing" else ""
    lines = [
        f"experiment: {spec.name} at {spec.experiment_path}",
        f"algorithm: {spec.algorithm}; scheduler: "
        + (
            f"{scheduler.type} (rungs at steps {', '.join(map(str, spec.rungs()))}, reduction "
            f"{scheduler.reduction_factor:g}, "
            f"max_t {spec.max_total_steps()}{rule})"
            if scheduler.type != "none"
            else "none"
        )
        + f"; metric: {spec.metric} ({spec.mode})",
        f"resources per trial: {spec.resources.cpu:g} cpu, {spec.resources.gpu:g} gpu; "
        f"max concurrent: {spec.max_concurrent or 'unlimited'}; max failures: {spec.max_failures}",
    ]
    sampled = {k: d for k, d in spec.search.items() if not d.is_grid}
    for key, dist in sampled.items():
        lines.append(f"sampled: {key} ~ {dist.describe()}")
    if spec.algorithm == "optuna":
        lines += [f"  {i + 1:>3}  (Optuna TPE suggestion, seed {spec.seed})" for i in range(spec.num_trials)]
    else:
        n = 0
        for point in spec.grid_points():
            for _ in range(spec.num_samples):
                for seed in spec.seeds if spec.repeats > 1 else [None]:
                    n += 1
                    label = short_params({**point, **({SEED_KEY: seed} if seed is not None else {})}) or "(base config)"
                    lines.append(f"  {n:>3}  {label}" + ("  + sampled" if sampled else ""))
    costs = [("without early stopping", spec.cost())]
    if scheduler.type == "asha":
        costs.append(
            (f"with ASHA's nominal cuts (1/{scheduler.reduction_factor:g} promoted at each rung)", spec.asha_cost())
        )
    for what, cost in costs:
        lines.append(
            f"cost {what}: {cost['steps']:,} training steps ({cost['images']:,} images), "
            f"{cost['fid_samples']:,} FID samples, {cost['inception_images']:,} images through Inception (reference "
            "included)"
        )
    lines.append(trial_count(spec.num_trials))
    return "\n".join(lines)


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

    spec = load_spec(
        spec_path, set_, name=name, storage=storage
    )  # bad input is refused here, before torch and Ray load
    if dry_run and resume:
        for line in resume_plan(spec.experiment_path, spec.num_trials):
            typer.echo(line)
        return
    typer.echo(describe(spec))
    for warning in spec.warnings():
        typer.echo(f"warning: {warning}", err=True)
    if dry_run:
        for warning in dry_run_warnings(spec, address or os.environ.get("RAY_ADDRESS")):
            typer.echo(f"warning: {warning}", err=True)
        return
    from sweeps.interrupt import CtrlC
    from sweeps.runner import SweepInterrupted, run_sweep

    try:
        results = run_sweep(spec, address=address, resume=resume, say=lambda line: typer.echo(line, err=True))
    except SweepInterrupted as interrupted:
        typer.echo(f"{interrupted}", err=True)
        raise typer.Exit(code=130) from None
    import ray

    ray.shutdown()  # the trials' last log lines arrive now, before the closing lines, not after them
    with CtrlC(tune=False) as ctrl_c:  # knows of a Ctrl-C even where a library swallowed it
        try:
            code = report_results(spec, results, analyze=analyze_after)
        except KeyboardInterrupt:
            pass
    if ctrl_c.pressed:
        typer.echo(
            f"analysis interrupted; the sweep itself finished: `sweep analyze {spec.experiment_path}` writes it",
            err=True,
        )
        raise typer.Exit(code=130)
    raise typer.Exit(code=code)


def report_results(spec, results, *, analyze: bool) -> int:
    """Print the outcome of a sweep and where to look, write the analysis; return the exit code:
    1 when a trial errored (after its retries) and the spec fails on trial errors, else 0. The
    outcome is `sweep status`'s table, in the record's words, so the run ends as status reads it."""
    from record.files import RAY_ERROR_FILE

    status(spec.experiment_path, watch=False, interval=0.0)
    if analyze:
        from analysis.report import analyze_location

        typer.echo("analysing: tables, plots, sample grids and the report", err=True)
        report, _ = analyze_location(spec.experiment_path, progress=sys.stderr.isatty())
        typer.echo(f"report: {report} (and report.html beside it)")
    typer.echo(f"TensorBoard: tensorboard --logdir {spec.experiment_path}")
    errored = [r for r in results if r.error]
    if not errored:
        return 0
    tracebacks = ", ".join(str(Path(r.path) / RAY_ERROR_FILE) for r in errored)
    typer.echo(f"{len(errored)} of {len(results)} trials errored; full tracebacks in {tracebacks}", err=True)
    return 1 if spec.fail_on_trial_error else 0


def resume_plan(experiment_path: str, num_trials: int) -> list[str]:
    """What `sweep run --resume` will do with each trial of an experiment, read from its record:
    ended trials are kept, unfinished and errored ones continue from their newest checkpoint
    (Ray's own record of it may be a milestone older), the rest start fresh."""
    from record import states, storage
    from record.experiment import load_experiment

    if storage.is_uri(experiment_path):
        raise ConfigError(
            f"--resume --dry-run: {experiment_path}: reads a local experiment; use `sweep status` for a URI"
        )
    experiment = load_experiment(Path(experiment_path))
    lines = [f"resuming {experiment_path}:"]
    for trial in experiment.trials:
        if trial.state in (states.FINISHED, states.STOPPED):
            plan = f"{trial.state}: kept as it is"
        elif trial.checkpoints:
            plan = f"{trial.state}: continues from its checkpoint at step {max(trial.checkpoints)}"
        else:
            plan = f"{trial.state}: starts fresh (no checkpoint yet)"
        lines.append(f"    {trial.trial_id}  {plan}")
    if len(experiment.trials) < num_trials:
        lines.append(f"    {num_trials - len(experiment.trials)} more not created yet: start fresh")
    return lines


def dry_run_warnings(spec, address: Optional[str]) -> list[str]:
    """What a real run would refuse that a dry run can see without starting Ray."""
    import torch

    if spec.resources.gpu > 0 and address is None and torch.cuda.device_count() == 0:
        return [
            f"resources.gpu: each trial asks for {spec.resources.gpu:g} GPU but this machine has none; "
            "a run here would be refused (set resources.gpu: 0, or attach to a cluster with --address)"
        ]
    return []


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
    from analysis.report import analyze_location

    typer.echo(f"analysing {experiment_dir}: tables, the study, sample grids, plots and the report", err=True)
    report, warnings = analyze_location(experiment_dir, out, progress=sys.stderr.isatty())
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"wrote {report}")


@app.command()
@exits_2_on_bad_input
def replay(
    experiment_dir: Path = typer.Argument(..., metavar="EXPERIMENT", help="A finished grid's experiment directory."),
    grace_period: Optional[int] = typer.Option(None, help="First rung, in steps (default: the first milestone)."),
    reduction_factor: float = typer.Option(2.0, min=1.0, help="Keep 1/reduction_factor of the trials at each rung."),
    z: float = typer.Option(2.5, min=0.0, help="Racing: stop only beyond this many standard errors."),
    concurrency: int = typer.Option(2, min=1, help="Trials running at once."),
    orders: int = typer.Option(200, min=1, help="Random arrival orders."),
    seed: int = typer.Option(0, help="Seed of the orders and speeds."),
):
    """Would early stopping have kept this grid's best, and what would it have saved? Replays the
    recorded FID curves through ASHA and the racing scheduler in many arrival orders (no training)."""
    from diffusion_lib.milestone import FID, STEP
    from record import states
    from record.best import comparable_rows
    from record.experiment import load_experiment
    from sweeps.replay import render
    from sweeps.replay import replay as replay_grid

    experiment = load_experiment(experiment_dir)
    curves = {t.trial_id: comparable_rows(t.milestones, FID.name, experiment.basis) for t in experiment.trials}
    # An errored trial (a diverged learning rate) is part of the grid's outcome; its curve ends where it failed.
    unfinished = [t.trial_id for t in experiment.trials if t.state not in (states.FINISHED, states.ERRORED)]
    if unfinished or not any(curves.values()):
        raise ConfigError(
            f"{experiment_dir}: a replay needs a grid whose every trial ended with {FID.name} at its "
            f"milestones; not ended: {', '.join(unfinished) or 'none'}"
        )
    first = min(rows[0][STEP.name] for rows in curves.values() if rows)
    info = replay_grid(
        curves,
        grace_period=grace_period or first,
        reduction_factor=reduction_factor,
        max_t=max(t.total_steps or 0 for t in experiment.trials),
        z=z,
        concurrency=concurrency,
        num_orders=orders,
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
    import contextlib
    import tempfile
    import time

    from analysis.status import refresh
    from analysis.status import watch as watch_status
    from record import storage
    from record.mirror import mirror_experiment

    with contextlib.ExitStack() as stack:
        path, shown, sync = Path(experiment_dir), None, None
        if storage.is_uri(experiment_dir):
            storage.validate_storage(experiment_dir, "EXPERIMENT")
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-status-"))) / storage.name_of(
                experiment_dir
            )
            shown = (str(path), experiment_dir)
            sync = functools.partial(mirror_experiment, experiment_dir, path)  # again before each refresh
            sync()

        def show(line: str) -> str:
            return line.replace(*shown) if shown else line

        def echo(line: str) -> None:
            typer.echo(show(line))

        def warn(line: str) -> None:
            typer.echo(show(line), err=True)

        def sleep(seconds: float) -> None:
            time.sleep(seconds)
            if sync is not None:
                try:
                    sync()
                except (ConfigError, OSError) as err:  # shown; the mirror stays as it was, retried next refresh
                    warn(f"warning: {err}")

        if watch:
            watch_status(path, interval, echo, warn, clear=sys.stdout.isatty(), sleep=sleep)
        else:
            refresh(path, echo, warn, clear=False)
