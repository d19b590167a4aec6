"""What `sweep run --resume --dry-run` prints: what resuming will do with each trial, read from
the experiment's record, so a user sees which trials are kept, continued or started over before
spending a cluster on it."""

from __future__ import annotations

import functools

from diffusion_lib.config import ConfigError
from record import states, storage
from record.experiment import load_experiment
from record.mirror import mirror_experiment

# A URI's record mirrored with its checkpoints as empty placeholders: their steps are what the
# plan needs, not their bytes.
_mirror_with_checkpoint_names = functools.partial(mirror_experiment, checkpoints=lambda mirror: [])


def resume_plan(experiment_path: str, num_trials: int) -> list[str]:
    """What `sweep run --resume` will do with each trial of an experiment (a path or URI), read
    from its record: ended trials are kept, unfinished and errored ones continue from their
    newest checkpoint (Ray's own record of it may be a milestone older), the rest start fresh."""
    with storage.local_folder(experiment_path, seed=_mirror_with_checkpoint_names, upload_changes=False) as folder:
        try:
            experiment = load_experiment(folder)
        except ConfigError as err:
            raise ConfigError(storage.named_as(experiment_path, folder)(str(err))) from None
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
