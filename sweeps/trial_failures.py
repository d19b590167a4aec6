"""Each failed trial attempt on the console as one line saying what happens next, where Ray
prints a traceback: a trial's code raised, its node died, or its storage could not be reached."""

from __future__ import annotations

import sys
from pathlib import Path

from ray.tune import Callback

from record.files import one_line_error


class FailureLines(Callback):
    """A trial's failed attempt (its code raised, its node died, its storage could not be
    reached) as one line: the error and whether Ray restarts it from its last checkpoint. The
    traceback stays in the trial's error.txt; Ray's own print of it is turned off
    (TUNE_PRINT_ALL_TRIAL_ERRORS=0 in sweeps.runner.configure_ray_console)."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(
            f"trial {trial}: attempt {trial.num_failures} failed ({last_error(trial)}); "
            f"Ray restarts it from its last checkpoint (max_failures: {self.max_failures})"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(
            f"trial {trial}: errored ({last_error(trial)}) after {trial.num_failures} failed attempt(s); "
            "`sweep run SPEC --resume` restarts it from its last checkpoint"
        )

    @staticmethod
    def _say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def last_error(trial) -> str:
    """The newest error in the error file Ray keeps on the driver's disk (the storage may be the
    thing that failed), as one line."""
    try:
        return one_line_error(Path(trial.local_path, trial.run_metadata.error_filename).read_text())
    except (OSError, TypeError):
        return "no error recorded"
