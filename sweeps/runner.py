"""Build and run (or resume) a Ray Tune experiment from a validated `SweepSpec`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from analysis.experiment import SUMMARY_FILE, SWEEP_FILE, trial_label
from diffusion_lib.atomic import atomic_write_text
from diffusion_lib.config import ConfigError

from .spec import SweepSpec, flatten_searched
from .trainable import train_trial


def experiment_path(spec: SweepSpec) -> str:
    """storage/name; a local storage path is made absolute, a URI (s3://, gs://, …) kept as is."""
    storage = spec.storage if "://" in spec.storage else str(Path(spec.storage).expanduser().resolve())
    return f"{storage.rstrip('/')}/{spec.name}"


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    listed = {"grid": tune.grid_search, "choice": tune.choice}
    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint, "quniform": tune.quniform}
    space = {}
    for key, dist in spec.search.items():
        kind, args = next(iter(dist.items()))
        space[key] = listed[kind](args) if kind in listed else ranges[kind](*args)
    return space


def short_params(searched: dict[str, Any]) -> str:
    """`loss.minsnr_gamma=5, model.base_channels=64` -> `minsnr_gamma=5,base_channels=64`."""
    return trial_label(flatten_searched(searched))


def trial_dirname(trial) -> str:
    """A readable, unique folder (and TensorBoard run) name per trial."""
    return f"{trial.trial_id}_{short_params(trial.config)}"[:120].replace("/", "_")


def parameter_columns(spec: SweepSpec) -> list[str]:
    """Searched keys as Ray's table names them. A searched section shows the keys every variant
    sets (`loss/weighting`); Ray's table fails on a key some trials lack, and the trial name
    shows all searched values anyway."""
    columns = []
    for key, dist in spec.search.items():
        values = next(iter(dist.values()))
        if all(isinstance(v, dict) for v in values):
            columns += [f"{key}/{k}" for k in values[0] if all(k in v for v in values)]
        else:
            columns.append(key)
    return columns


def make_tuner_parts(spec: SweepSpec, trainable: Callable) -> tuple[Any, Any, Any]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    wrapped = tune.with_resources(
        tune.with_parameters(trainable, base=spec.base),
        {"cpu": spec.trial_resources.cpu, "gpu": spec.trial_resources.gpu},
    )
    scheduler = None
    if spec.asha.type == "asha":
        # time_attr is the training step: grace period and rungs are in steps, not reports.
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=spec.max_total_steps(),
            grace_period=spec.asha.grace_period,
            reduction_factor=spec.asha.reduction_factor,
        )
    search_alg = OptunaSearch(seed=spec.seed) if spec.algorithm == "optuna" else None
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent,
        trial_name_creator=trial_dirname,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=experiment_path(spec).rsplit("/", 1)[0],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # The newest checkpoint is always kept (for resume) plus the best by the metric (for analysis).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # Ray's result.json/progress.csv back the ResultGrid; its TensorBoard logger is left out
        # because the trainer writes the trial's TensorBoard log itself (with grids and hparams).
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
        progress_reporter=tune.CLIReporter(
            metric_columns=[spec.metric, "step", "train/loss"],
            parameter_columns=parameter_columns(spec),
            max_report_frequency=30,
            sort_by_metric=True,
        ),
        verbose=1,
    )
    return wrapped, tune_config, run_config


def run_sweep(
    spec: SweepSpec,
    *,
    address: Optional[str] = None,
    resume: bool = False,
    trainable: Callable = train_trial,
):
    """Run the sweep to completion (or resume it) and return Ray Tune's ResultGrid."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # loggers are chosen in make_tuner_parts
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the CLIReporter table with our columns
    # Every milestone report carries a checkpoint by design; Ray's warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    path = experiment_path(spec)
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    if not resume and exists:
        raise ConfigError(f"{path} already holds experiment {spec.name!r}; pass --resume to finish it or --name to start another")

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False)
    check_resources(spec, ray.cluster_resources())
    wrapped, tune_config, run_config = make_tuner_parts(spec, trainable)
    if resume:
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(wrapped, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)
    if "://" not in path:  # what analysis needs to read the experiment from files alone
        atomic_write_text(Path(path) / SWEEP_FILE, json.dumps({"metric": spec.metric, "mode": spec.mode, "search": spec.search}, indent=1))
    results = tuner.fit()
    if "://" not in path:
        write_summary(results, Path(path))
    return results


def check_resources(spec: SweepSpec, cluster: dict[str, float]) -> None:
    """A trial asking for more than the whole cluster has would wait forever: refuse it now."""
    for name, wanted in (("cpu", spec.trial_resources.cpu), ("gpu", spec.trial_resources.gpu)):
        available = cluster.get(name.upper(), 0.0)
        if wanted > available:
            raise ConfigError(
                f"resources.{name}: each trial asks for {wanted:g} {name.upper()} but the Ray cluster has {available:g}; "
                f"lower resources.{name} in the spec (e.g. 0 to run on CPU) or attach to a cluster with --address"
            )


def write_summary(results, experiment_dir: Path) -> None:
    """Each trial's final status and error, for analysis that reads files only."""
    trials = {}
    for result in results:
        trial_dir = Path(result.path).name
        trials[trial_dir] = {
            "status": "ERROR" if result.error else "TERMINATED",
            "error": f"{type(result.error).__name__}: {result.error}" if result.error else None,
        }
    atomic_write_text(experiment_dir / SUMMARY_FILE, json.dumps({"trials": trials}, indent=1))
