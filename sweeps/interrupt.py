"""Ctrl-C in the driver while Ray Tune runs the trials.

A terminal sends SIGINT to the whole process group. Ray Tune's own handler stops the run and
saves its state, but tells its caller nothing, so a sweep stopped before its first milestone
looked finished. This handler notes that the user interrupted and hands the stop to Tune through
SIGUSR1, which Tune always listens to; a second Ctrl-C raises KeyboardInterrupt at once. Outside
`tuner.fit` Python's own KeyboardInterrupt does the job. Tune's own lines about the stop (its
`Tuner.restore(...)` hint) are left out: the CLI says how to resume, with `sweep run --resume`.
"""

from __future__ import annotations

import logging
import os
import signal
from types import TracebackType
from typing import Optional


class CtrlC:
    """`with CtrlC() as ctrl_c: tuner.fit()`, then `ctrl_c.pressed` says whether the user stopped it.
    `CtrlC(tune=False)` guards plain work (the analysis): Ctrl-C raises KeyboardInterrupt as
    usual, and `pressed` tells it even where a library caught the KeyboardInterrupt on its way."""

    def __init__(self, tune: bool = True) -> None:
        self.tune = tune
        self.pressed = False

    def __enter__(self) -> "CtrlC":
        if self.tune:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's handler would swallow the fact
            TUNE_LOGGER.addFilter(_tune_stop_lines)
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        first = not self.pressed
        self.pressed = True
        if self.tune and first:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends the run, saving its state one last time
        else:
            raise KeyboardInterrupt

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        signal.signal(signal.SIGINT, self._previous)
        if self.tune:
            TUNE_LOGGER.removeFilter(_tune_stop_lines)


TUNE_LOGGER = logging.getLogger("ray.tune.tune")


def _tune_stop_lines(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Stop signal received" in message or "Tuner.restore" in message)
