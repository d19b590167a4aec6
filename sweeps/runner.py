"""Build and run (or resume) a Ray Tune experiment from a validated `SweepSpec`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from diffusion_lib.build import create_trainer
from diffusion_lib.config import SEED_KEY, ConfigError
from diffusion_lib.data import load_dataset
from diffusion_lib.metrics.fid import FeatureExtractor
from diffusion_lib.milestone import STEP, TRAIN_LOSS
from diffusion_lib.run_log import write_hparams_config
from record import states, storage
from record.driver_lock import DriverLock
from record.files import RAY_ERROR_FILE, Interruption, Summary, SweepFile, TrialOutcome, one_line_error

from . import worker_setup
from .asha import Asha
from .console import one_line_console, sweep_reporter
from .interrupt import CtrlC, ray_init_keeps_stop_handlers
from .local_ray import EndWhenLocalRayDies
from .optuna_search import StoppedAsPrunedOptunaSearch
from .racing import DynamicsRacingScheduler, RacingScheduler, RacingStateCallback
from .resume_plan import refuse_unreadable_ray_state
from .session_end import SessionEndCallback
from .shared_reference import shares_fid_reference, with_shared_fid_reference
from .spec import SweepSpec, short_params
from .trainable import TrainerFactory, train_trial
from .trial_failures import FailureLines


def trial_dirname(trial) -> str:
    """A readable, unique folder (and TensorBoard run) name per trial."""
    return f"{trial.trial_id}_{short_params(trial.config)}"[:120].replace("/", "_")


class NoSpaceLeft(Exception):
    """The experiment's disk filled up (or its quota ran out) while the sweep wrote to it: one line
    naming the path and what to do once there is space again. Not bad input: exit 1, not 2."""


UNFINISHED = "interrupted with trials unfinished; the state is saved: `sweep run SPEC --resume` finishes it"


class SweepInterrupted(Exception):
    """The sweep was stopped (Ctrl-C or SIGTERM) before every trial ended (no summary is written:
    it would be stale); `exit_code` is the stop's (`CtrlC.exit_code`)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def storage_root(spec: SweepSpec) -> str:
    """Where the experiment's folder is made (Ray Tune's storage_path): the spec's storage, a
    local path made absolute."""
    return spec.storage if storage.is_uri(spec.storage) else str(Path(spec.experiment_path).parent)


def make_tuner_parts(
    spec: SweepSpec, make_trainer: TrainerFactory, fid_notes_said: bool = False
) -> tuple[Any, Any, Any]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    wrapped = tune.with_resources(
        tune.with_parameters(
            train_trial,
            base=spec.run_config,
            make_trainer=make_trainer,
            fid_notes_said=fid_notes_said,
            experiment=spec.experiment_path,
        ),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    search_alg = StoppedAsPrunedOptunaSearch(spec.run_config, seed=spec.seed) if spec.algorithm == "optuna" else None
    scheduler = make_scheduler(spec)
    # Ray keeps no scheduler state across a driver restart; the racing scheduler's rides along in
    # Tune's experiment checkpoints through its callback (sweeps/racing.py).
    keeps_state = [RacingStateCallback(scheduler)] if isinstance(scheduler, RacingScheduler) else []
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent,
        trial_name_creator=trial_dirname,
        trial_dirname_creator=trial_dirname,
        # A trial's worker is handed the next trial: torch imported, Inception loaded (a few
        # seconds a trial, the most of a short trial's start-up).
        reuse_actors=True,
    )
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=storage_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # The newest checkpoint is always kept (for resume) plus the best by the metric (for analysis).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode
        ),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # Ray's result.json/progress.csv back the ResultGrid; its TensorBoard logger is left out
        # because the trainer writes the trial's TensorBoard log itself (with grids and hparams).
        callbacks=[
            JsonLoggerCallback(),
            CSVLoggerCallback(),
            SessionEndCallback(spec.experiment_path),
            FailureLines(spec.max_failures),
            *keeps_state,
        ],
        progress_reporter=sweep_reporter(
            list(dict.fromkeys([spec.metric, STEP.name, TRAIN_LOSS.name])),
            [column for searched in spec.search.values() for column in searched.columns()],
            total_steps=lambda searched: spec.trial_config(searched).train.total_steps,
        ),
        verbose=1,
    )
    return wrapped, tune_config, run_config


def make_scheduler(spec: SweepSpec) -> Any:
    """The spec's early-stopping scheduler (None: every trial runs to its end). Its time_attr is
    the training step: grace period and rungs are in steps, not reports."""
    settings = spec.scheduler
    rungs = dict(
        time_attr=STEP.name,
        max_t=spec.max_total_steps(),
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    if settings.type == "asha":
        return Asha(**rungs)
    racing = {"racing": RacingScheduler, "racing_dynamics": DynamicsRacingScheduler}.get(settings.type)
    return racing(**rungs, z=settings.z, experiment=spec.experiment_path) if racing else None


def run_sweep(
    spec: SweepSpec,
    *,
    address: Optional[str] = None,
    resume: bool = False,
    make_trainer: TrainerFactory = create_trainer,
    features: Optional[FeatureExtractor] = None,
    say: Callable[[str], None] = lambda line: None,
):
    """`drive_sweep` holding the experiment's driver lock (record.driver_lock), taken before Ray
    starts and before anything is written: a second `sweep run` of the experiment is refused
    (ConfigError) naming the first. A full disk raises NoSpaceLeft. A run that fails before it
    has anything to resume (no Ray Tune state to restore) removes the folders it made: a plain
    rerun starts the experiment again, and `--resume` never meets half of one."""
    configure_ray_console()
    from ray import tune

    path = spec.experiment_path
    storage.validate_storage(spec.storage)  # a bad URI or unreachable endpoint: exit 2 before anything is written
    made_here = storage.missing_folders(path)
    try:
        with DriverLock.take(path, say):
            results = drive_sweep(
                spec, address=address, resume=resume, make_trainer=make_trainer, features=features, say=say
            )
    except BaseException as err:
        bad_input_or_stop = isinstance(err, (ConfigError, SweepInterrupted)) or not isinstance(err, Exception)
        full = None if bad_input_or_stop else storage.full_disk_path(err, path)  # before removing frees space
        resumable = tune.Tuner.can_restore(path)
        if made_here and not resumable:
            storage.remove_folders(made_here)
        if full is not None:
            raise NoSpaceLeft(_no_space_left_line(full, resumable)) from err
        raise
    # Trials that errored for want of space end the sweep as the full disk it is (the analysis
    # would only fail on it too); their summary stands, and `--resume` restarts them.
    for result in results:
        if result.error is not None and (full := storage.full_disk_path(result.error, path)) is not None:
            raise NoSpaceLeft(_no_space_left_line(full, resumable=True))
    return results


def _no_space_left_line(path: str, resumable: bool) -> str:
    """NoSpaceLeft's line: where, and what to do once there is space again."""
    then = "`sweep run SPEC --resume` finishes it" if resumable else "run the same command again"
    return f"no space left on device writing {path}; free space there, then {then}"


def drive_sweep(
    spec: SweepSpec,
    *,
    address: Optional[str] = None,
    resume: bool = False,
    make_trainer: TrainerFactory = create_trainer,
    features: Optional[FeatureExtractor] = None,
    say: Callable[[str], None] = lambda line: None,
):
    """Run the sweep to completion (or resume it), write its summary and return Ray Tune's
    ResultGrid. Bad input is a ConfigError before any trial starts; an interrupted sweep
    (Ctrl-C or SIGTERM) raises SweepInterrupted without writing a summary.

    `features` computes the sweep's FID reference (default: pytorch-fid's Inception); `say`
    tells the user each phase in a line. Run by `run_sweep`, under the driver lock."""
    from ray import tune

    path = spec.experiment_path
    check_experiment_location(spec, resume)
    with CtrlC(tune=False) as before_trials:
        try:
            data = load_dataset(spec.run_config.data)  # bad data is exit 2 before Ray starts
            start_ray(address or os.environ.get("RAY_ADDRESS"))
            cluster = ray_cluster_resources()
            say(describe_cluster(cluster))
            check_resources(spec, cluster)
            fid_notes_said = shares_fid_reference(spec)  # the launcher says them once, with the reference
            spec = with_shared_fid_reference(spec, data, features, say)
            if before_trials.pressed:  # its KeyboardInterrupt was lost (raised in an at-fork handler: "ignored")
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            then = (
                "`sweep run SPEC --resume` finishes it" if resume else "nothing to resume: run the same command again"
            )
            raise SweepInterrupted(f"interrupted before any trial started; {then}", before_trials.exit_code) from None
    wrapped, tune_config, run_config = make_tuner_parts(spec, make_trainer, fid_notes_said)
    if resume:
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(wrapped, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)
        write_hparams(path, spec.dotted_keys())
    # What analysis and `sweep status` need to read the experiment from files alone, on any storage.
    SweepFile(spec.metric, spec.mode, spec.recorded_search()).write(path)
    say(f"starting {states.trial_count(spec.num_trials)}")
    with CtrlC() as ctrl_c, EndWhenLocalRayDies(ctrl_c, lambda: _end_without_ray(path, ctrl_c.exit_code, say)):
        results = tuner.fit()
    finished = results.num_terminated + results.num_errors  # early-stopped trials count as terminated
    if ctrl_c.pressed or finished < spec.num_trials:  # Ray saved its state and returned early
        Interruption(UNFINISHED).write(path)
        raise SweepInterrupted(UNFINISHED, ctrl_c.exit_code)
    summary(results, spec).write(path)
    Interruption.remove(path)  # a resumed sweep has ended: the note of its interruption is history
    return results


def _end_without_ray(path: str, exit_code: int, say: Callable[[str], None]) -> NoReturn:
    """The end of a sweep whose stop signal also ended the Ray daemons this driver started
    (`sweeps.local_ray`): Tune has saved its state but cannot shut its trials down, so the driver
    ends here, from the watching thread, as an interrupted sweep ends."""
    say("the stop signal also ended Ray's own processes (sent to the whole process group); workers stopped")
    Interruption(UNFINISHED).write(path)
    say(UNFINISHED)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def check_experiment_location(spec: SweepSpec, resume: bool) -> None:
    """An experiment there to resume, with a state Ray can read (or none to overwrite)."""
    from ray import tune

    path = spec.experiment_path
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    if not resume and exists:
        raise ConfigError(
            f"{path} already holds experiment {spec.name!r}; pass --resume to finish it or --name to start another"
        )
    if resume:
        refuse_unreadable_ray_state(path)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Ray Tune search space: each searched key's domain, and the seeds of the repeats."""
    from ray import tune

    space = {key: searched.tune_domain() for key, searched in spec.search.items()}
    if spec.repeats > 1:
        space[SEED_KEY] = tune.grid_search(spec.seeds)
    return space


def write_hparams(experiment: str, hparam_names: list[str]) -> None:
    """TensorBoard's HParams config (a local events file) into the experiment, uploaded for a URI."""
    with storage.local_folder(experiment) as folder:
        write_hparams_config(folder, hparam_names)


def configure_ray_console() -> None:
    """Ray Tune's console as the CLIReporter table with our columns, its loggers ours."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # loggers are chosen in make_tuner_parts
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the CLIReporter table with our columns
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # a failed attempt is one line (trial_failures.py)
    # Every milestone report carries a checkpoint by design; Ray's warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # colour codes only for a terminal
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    one_line_console()


def start_ray(address: Optional[str]) -> None:
    """Attach to the cluster at `address`, or start a local Ray without its dashboard (unless
    Ray is started already, as tests do).

    Ray's default token authentication stays on; only its notice that it is on (printed on
    every start, nothing to act on) and Ray's INFO lines are kept out of the console.
    """
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    worker_setup.skip_prestarted_workers()
    with ray_init_keeps_stop_handlers():
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env=worker_setup.RUNTIME_ENV,
        )


def ray_cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def describe_cluster(cluster: dict[str, float]) -> str:
    """Which Ray the sweep runs on, and its size: `ray.init()` without an address also joins a
    cluster that `ray start` left running on this machine."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    return (
        f"Ray at {ray.get_runtime_context().gcs_address}: {nodes} node{'s' if nodes != 1 else ''}, "
        f"{cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs"
    )


def check_resources(spec: SweepSpec, cluster: dict[str, float]) -> None:
    """A trial asking for more than the whole cluster has would wait forever: refuse it now."""
    for name, wanted in (("cpu", spec.resources.cpu), ("gpu", spec.resources.gpu)):
        available = cluster.get(name.upper(), 0.0)
        if wanted > available:
            raise ConfigError(
                f"resources.{name}: "
                f"each trial asks for {wanted:g} {name.upper()} but the Ray cluster has {available:g}; "
                f"lower resources.{name} in the spec (e.g. 0 to run on CPU) or attach to a cluster with --address"
            )


def summary(results, spec: SweepSpec) -> Summary:
    """Each trial's outcome: errored (after its retries), finished (it reached its last step) or
    stopped early by the scheduler; an errored trial with its error in one line and where its
    full traceback is."""
    outcomes = {}
    for result in results:
        name = Path(result.path).name  # a local path, or the trial's path on the storage's filesystem
        if result.error:
            traceback = storage.join(spec.experiment_path, name, RAY_ERROR_FILE)
            outcomes[name] = TrialOutcome(states.ERRORED, one_line_error(str(result.error)), traceback)
            continue
        total = spec.trial_config(result.config).train.total_steps
        reached = (result.metrics or {}).get(STEP.name, 0)
        outcomes[name] = TrialOutcome(states.terminated_state(reached, total))
    return Summary(outcomes)
