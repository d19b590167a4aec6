"""Each trial's HParams status in TensorBoard, written by the driver when the trial ends: a
trial that the scheduler stops cannot write it itself (Ray ends its actor mid-run).

The Status filter of TensorBoard's HParams tab has Success, Failure, Running and Unknown, no
"stopped early": a trial that ran its steps and one the scheduler stopped both read Success,
as TensorBoard's own Keras callback marks a run ended by early stopping; an errored trial
(after its retries) reads Failure; a running or interrupted one, Unknown. A finished trial is
told from a stopped one by its `val/final_fid` column (where the spec computes one), and in
`sweep status` and the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray.tune import Callback

from diffusion_lib.run_log import write_session_end
from record import storage


class SessionEndCallback(Callback):
    """Writes the HParams session end into each trial's folder of `experiment` (a path or URI)."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._write(trial, succeeded=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._write(trial, succeeded=False)

    def _write(self, trial, succeeded: bool) -> None:
        folder = storage.join(self.experiment, Path(trial.path).name)
        try:
            with storage.local_folder(folder) as local:
                write_session_end(local, succeeded)
        except OSError as err:  # a status TensorBoard lacks is no reason to stop the sweep
            print(f"warning: TensorBoard's HParams status of {trial} not written: {err}", file=sys.stderr)
