"""Build and run (or resume) a Ray Tune experiment from a validated `SweepSpec`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from diffusion_lib.build import create_trainer, resolve_device
from diffusion_lib.config import ConfigError
from diffusion_lib.data import ImageDataset, load_dataset
from diffusion_lib.metrics.fid import FeatureExtractor, InceptionFeatures, reference_statistics
from diffusion_lib.run_log import write_hparams_config

from . import storage
from .layout import RAY_ERROR_FILE, REFERENCE_DIR, SUMMARY_FILE, SWEEP_FILE, one_line_error
from .spec import SweepSpec, short_params
from .trainable import TrainerFactory, train_trial
from diffusion_lib.milestone import STEP, TRAIN_LOSS


def trial_dirname(trial) -> str:
    """A readable, unique folder (and TensorBoard run) name per trial."""
    return f"{trial.trial_id}_{short_params(trial.config)}"[:120].replace("/", "_")


class SweepInterrupted(Exception):
    """The sweep was stopped before every trial ended (no summary is written: it would be stale)."""


def storage_root(spec: SweepSpec) -> str:
    """Where the experiment's folder is made (Ray Tune's storage_path): the spec's storage, a
    local path made absolute."""
    return spec.storage if storage.is_uri(spec.storage) else str(Path(spec.experiment_path).parent)


def parameter_columns(spec: SweepSpec) -> list[str]:
    """Searched keys as Ray's table names them. A searched section shows the keys every variant
    sets (`loss/weighting`); Ray's table fails on a key some trials lack, and the trial name
    shows all searched values anyway."""
    columns = []
    for key, dist in spec.search.items():
        values = dist.args
        if dist.is_listed and all(isinstance(v, dict) for v in values):
            columns += [f"{key}/{k}" for k in values[0] if all(k in v for v in values)]
        else:
            columns.append(key)
    return columns


def make_tuner_parts(spec: SweepSpec, make_trainer: TrainerFactory) -> tuple[Any, Any, Any]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    wrapped = tune.with_resources(
        tune.with_parameters(train_trial, base=spec.run_config, make_trainer=make_trainer),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    scheduler = None
    if spec.scheduler.type == "asha":
        # time_attr is the training step: grace period and rungs are in steps, not reports.
        scheduler = ASHAScheduler(
            time_attr=STEP.name,
            max_t=spec.max_total_steps(),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
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
        storage_path=storage_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # The newest checkpoint is always kept (for resume) plus the best by the metric (for analysis).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # Ray's result.json/progress.csv back the ResultGrid; its TensorBoard logger is left out
        # because the trainer writes the trial's TensorBoard log itself (with grids and hparams).
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
        progress_reporter=tune.CLIReporter(
            metric_columns=[spec.metric, STEP.name, TRAIN_LOSS.name],
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
    make_trainer: TrainerFactory = create_trainer,
    features: Optional[FeatureExtractor] = None,
):
    """Run the sweep to completion (or resume it) and return Ray Tune's ResultGrid.

    `features` computes the sweep's FID reference (default: pytorch-fid's Inception)."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # loggers are chosen in make_tuner_parts
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the CLIReporter table with our columns
    # Every milestone report carries a checkpoint by design; Ray's warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    path = spec.experiment_path
    storage.validate_storage(spec.storage)  # a bad URI or unreachable endpoint: exit 2 before anything starts
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    if not resume and exists:
        raise ConfigError(f"{path} already holds experiment {spec.name!r}; pass --resume to finish it or --name to start another")

    data = load_dataset(spec.run_config.data)  # bad data is exit 2 before Ray starts
    if not ray.is_initialized():
        start_ray(address or os.environ.get("RAY_ADDRESS"))
    check_resources(spec, ray.cluster_resources())
    spec = with_shared_fid_reference(spec, data, features)
    wrapped, tune_config, run_config = make_tuner_parts(spec, make_trainer)
    if resume:
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {key: dist.tune_domain() for key, dist in spec.search.items()}
        if spec.repeats > 1:
            param_space["train.seed"] = tune.grid_search(spec.seeds)
        tuner = tune.Tuner(wrapped, param_space=param_space, tune_config=tune_config, run_config=run_config)
    # What analysis and `sweep status` need to read the experiment from files alone, on any storage.
    if not resume:
        write_hparams(path, searched_hparams(spec))
    storage.write_text(storage.join(path, SWEEP_FILE), json.dumps({"metric": spec.metric, "mode": spec.mode, "search": {k: {d.kind: list(d.args)} for k, d in spec.search.items()}}, indent=1))
    results = tuner.fit()
    finished = results.num_terminated + results.num_errors  # ASHA's stopped trials count as terminated
    if finished < spec.num_trials:  # Ctrl-C: Ray saved its state and returned early
        raise SweepInterrupted(f"interrupted with {spec.num_trials - finished} of {spec.num_trials} trials unfinished; "
                               f"the state is saved: `sweep run SPEC --resume` finishes it")
    write_summary(results, path)
    return results


def write_hparams(experiment: str, hparam_names: list[str]) -> None:
    """TensorBoard's HParams config (a local events file) into the experiment, uploaded for a URI."""
    if not storage.is_uri(experiment):
        write_hparams_config(Path(experiment), hparam_names)
        return
    with tempfile.TemporaryDirectory(prefix="sweep-hparams-") as scratch:
        write_hparams_config(Path(scratch), hparam_names)
        storage.upload_tree(scratch, experiment)


def with_shared_fid_reference(spec: SweepSpec, data: ImageDataset, features: Optional[FeatureExtractor]) -> SweepSpec:
    """The spec with `fid.reference` set to reference statistics computed once, here, for all
    trials, and stored with the experiment (it also records which reference every FID of the
    sweep was measured against). Otherwise each concurrent trial on a machine with an empty
    cache would run the same Inception pass. Left to the trials when the searched keys change
    the reference (data, fid.ref_num_images) or FID is off.

    On a URI storage the statistics are computed in a local folder (seeded with the references
    already stored, so a resumed sweep reuses its own), uploaded to `<experiment>/fid_reference/`,
    and `fid.reference` is that URI: each trial downloads it (sweeps/trainable.py)."""
    config = spec.run_config
    fid_on = config.fid.num_samples or config.fid.final_num_samples or "fid.num_samples" in spec.search
    per_trial = any(key in ("data", "fid.ref_num_images") or key.startswith("data.") for key in spec.search)
    if not fid_on or per_trial or config.fid.reference:
        return spec
    features = features or InceptionFeatures(config.fid.weights, resolve_device(config.train.device), config.fid.batch_size)
    experiment = spec.experiment_path
    if not storage.is_uri(experiment):
        folder = Path(experiment) / REFERENCE_DIR
        reference = reference_statistics(data, features, config.fid.ref_num_images, folder)
        return dataclasses.replace(spec, run_config=config.with_overrides({"fid.reference": str(folder / reference.name)}))
    stored = storage.join(experiment, REFERENCE_DIR)
    with tempfile.TemporaryDirectory(prefix="sweep-fid-reference-") as scratch:
        storage.download_tree(stored, scratch)
        reference = reference_statistics(data, features, config.fid.ref_num_images, scratch)
        target = storage.join(stored, reference.name)
        if not storage.exists(target):
            storage.upload(Path(scratch) / reference.name, target)
    return dataclasses.replace(spec, run_config=config.with_overrides({"fid.reference": target}))


def searched_hparams(spec: SweepSpec) -> list[str]:
    """The searched keys as dotted config keys: the HParams view's columns (a searched section
    shows each key its variants set)."""
    names = []
    for key, dist in spec.search.items():
        if dist.is_listed and all(isinstance(v, dict) for v in dist.args):
            names += [f"{key}.{k}" for v in dist.args for k in v]
        else:
            names.append(key)
    return list(dict.fromkeys(names))


def start_ray(address: Optional[str]) -> None:
    """Attach to the cluster at `address`, or start a local Ray without its dashboard.

    Ray's default token authentication stays on; only its notice that it is on (printed on
    every start, nothing to act on) and Ray's INFO lines are kept out of the console.
    """
    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)


def check_resources(spec: SweepSpec, cluster: dict[str, float]) -> None:
    """A trial asking for more than the whole cluster has would wait forever: refuse it now."""
    for name, wanted in (("cpu", spec.resources.cpu), ("gpu", spec.resources.gpu)):
        available = cluster.get(name.upper(), 0.0)
        if wanted > available:
            raise ConfigError(
                f"resources.{name}: each trial asks for {wanted:g} {name.upper()} but the Ray cluster has {available:g}; "
                f"lower resources.{name} in the spec (e.g. 0 to run on CPU) or attach to a cluster with --address"
            )


def write_summary(results, experiment: str) -> None:
    """Each trial's final status, and for an errored trial its error in one line and where its
    full traceback is, for analysis and `sweep status`, which read files only."""
    trials = {}
    for result in results:
        name = Path(result.path).name  # a local path, or the trial's path on the storage's filesystem
        trials[name] = {
            "status": "ERROR" if result.error else "TERMINATED",
            "error": one_line_error(str(result.error)) if result.error else None,
            "traceback": storage.join(experiment, name, RAY_ERROR_FILE) if result.error else None,
        }
    storage.write_text(storage.join(experiment, SUMMARY_FILE), json.dumps({"trials": trials}, indent=1))
