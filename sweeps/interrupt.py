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
    """`with CtrlC() as ctrl_c: tuner.fit()`, then `ctrl_c.pressed` says whether the user stopped it."""

    def __init__(self) -> None:
        self.pressed = False

    def __enter__(self) -> "CtrlC":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's handler would swallow the fact
        self._previous = signal.signal(signal.SIGINT, self._handle)
        TUNE_LOGGER.addFilter(_tune_stop_lines)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends the run, saving its state one last time

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        signal.signal(signal.SIGINT, self._previous)
        TUNE_LOGGER.removeFilter(_tune_stop_lines)


TUNE_LOGGER = logging.getLogger("ray.tune.tune")


def _tune_stop_lines(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Stop signal received" in message or "Tuner.restore" in message)
