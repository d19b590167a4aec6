"""What `sweep run --resume --dry-run` prints: what resuming will do with each trial, read from
the experiment's record, so a user sees which trials are kept, continued or started over before
spending a cluster on it."""

from __future__ import annotations

from pathlib import Path

from diffusion_lib.config import ConfigError
from diffusion_lib.run_files import checkpoint_damage, checkpoint_step
from record import states, storage
from record.experiment import Trial, load_experiment, unreadable_ray_state
from record.files import RAY_STATE_GLOB, resume_order
from record.mirror import mirror_experiment

KEPT = (states.FINISHED, states.STOPPED)  # what a resume leaves as it is


def resume_plan(experiment_path: str, num_trials: int) -> list[str]:
    """What `sweep run --resume` will do with each trial of an experiment (a path or URI), read
    from its record: ended trials are kept (`record.repair` puts back the rows a finished one's
    metrics.jsonl lost), unfinished and errored ones continue from the checkpoint Ray restores,
    or, when that file is damaged, from the one the trial falls back to (`sweeps.trainable`);
    the rest start fresh."""
    refuse_unreadable_ray_state(experiment_path)
    with storage.local_folder(experiment_path, seed=_mirror_for_the_plan, upload_changes=False) as folder:
        try:
            experiment = load_experiment(folder)
        except ConfigError as err:
            raise ConfigError(storage.named_as(experiment_path, folder)(str(err))) from None
        lines = [f"resuming {experiment_path}:"]
        lines += [f"    {trial.trial_id}  {trial.state}: {_plan(trial)}" for trial in experiment.trials]
    if len(experiment.trials) < num_trials:
        lines.append(f"    {num_trials - len(experiment.trials)} more not created yet: start fresh")
    return lines


def refuse_unreadable_ray_state(location: str) -> None:
    """A ConfigError when Ray's latest experiment state at `location` (a path or URI; only its
    state files are fetched from a URI) cannot be read: Ray cannot resume the sweep, and its
    records still stand."""
    with storage.local_folder(location, seed=_ray_states, upload_changes=False) as folder:
        damage = unreadable_ray_state(folder)
    if damage:
        raise ConfigError(
            f"--resume: {damage} in {location}, so Ray cannot resume the sweep; "
            f"the trials' records stand: `sweep status {location}` and `sweep analyze {location}` read them"
        )


def _ray_states(location: str, folder: Path) -> None:
    storage.download_matching(location, folder, RAY_STATE_GLOB)


def _plan(trial: Trial) -> str:
    if trial.lacks_its_end:
        return "kept; the milestones its metrics.jsonl lost are put back from its checkpoints' copies"
    if trial.state in KEPT:
        return "kept as it is"
    candidates = _candidates(trial)
    if not candidates:
        return "starts fresh (no checkpoint yet)"
    unreadable = []
    for path in candidates:
        damage = checkpoint_damage(path)
        if damage is None:
            continues = f"continues from its checkpoint at step {checkpoint_step(path.name)}"
            return "; ".join([*unreadable, continues])
        unreadable.append(f"checkpoint at step {checkpoint_step(path.name)} unreadable ({damage})")
    return "; ".join([*unreadable, "starts over from step 0"])


def _candidates(trial: Trial) -> list[Path]:
    """The checkpoints the resumed trial tries, in turn (`record.files.resume_order`)."""
    return resume_order(trial.checkpoints.values(), trial.ray_checkpoint)


def _mirror_for_the_plan(location: str, folder: Path) -> None:
    """A URI's record mirrored with the checkpoints the plan checks (those of the trials a
    resume continues) downloaded, the others as empty placeholders: their steps are what the
    plan needs of them, not their bytes."""

    def to_check(mirror: Path) -> list[Path]:
        try:
            trials = load_experiment(mirror).trials
        except ConfigError:  # said by the plan's own reading of the mirror, naming the URI
            return []
        return [path for trial in trials if trial.state not in KEPT for path in _candidates(trial)]

    mirror_experiment(location, folder, fetch=to_check)
