"""The `sweep` command line: train one run, run a search, compute FID, analyse an experiment.

Bad input (config, spec, data, checkpoint) is reported in one line naming what is wrong,
with exit code 2, before any expensive work starts.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from diffusion_lib.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.batch_size=128 (repeatable).")


def exits_2_on_bad_input(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2)

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
    from diffusion_lib.config import load_config
    from diffusion_lib.trainer import Trainer

    run_config = load_config(config, set_)
    trainer = Trainer(run_config, out, progress=progress and sys.stderr.isatty())
    if trainer.step:
        typer.echo(f"resuming {out} from step {trainer.step}", err=True)
    summary = trainer.fit()
    typer.echo(json.dumps(summary))


def _features(weights: Optional[str], device: str, batch_size: int):
    from diffusion_lib.metrics.fid import InceptionFeatures
    from diffusion_lib.trainer import resolve_device

    return InceptionFeatures(weights, resolve_device(device), batch_size)


WeightsOption = typer.Option(None, "--weights", help="pytorch-fid Inception weights file (default: $SWEEP_FID_WEIGHTS or download).")


@app.command()
@exits_2_on_bad_input
def fid(
    source_a: Path = typer.Argument(..., help="Image folder or .npz statistics."),
    source_b: Path = typer.Argument(..., help="Image folder or .npz statistics."),
    weights: Optional[str] = WeightsOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(200, help="Inception batch size."),
):
    """Print the FID between two sources, like `python -m pytorch_fid A B`."""
    from diffusion_lib.metrics.fid import frechet_distance, stats_of_source

    for source in (source_a, source_b):
        if not source.exists():
            raise ConfigError(f"{source}: no such folder or file")
    features = _features(weights, device, batch_size)
    typer.echo(f"FID: {frechet_distance(stats_of_source(source_a, features), stats_of_source(source_b, features))}")


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
