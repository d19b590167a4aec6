"""Ctrl-C, or SIGTERM, in the driver of a sweep: both end it the same way, Ray Tune saving its
state and the CLI saying how to resume, with exit code 130 after Ctrl-C and 143 after SIGTERM
(128 + the signal's number, as a shell reports a process a signal ended).

A terminal sends SIGINT to the whole process group; `kill`, a batch system or a container's
stop sends SIGTERM. Ray Tune's own SIGINT handler stops the run and saves its state, but tells
its caller nothing, so a sweep stopped before its first milestone looked finished. This handler
notes the signal and hands the stop to Tune through SIGUSR1, which Tune always listens to; a
second signal raises KeyboardInterrupt at once. Outside `tuner.fit` either signal raises
KeyboardInterrupt, which is what Python's default does for Ctrl-C. Tune's own lines about the
stop (its `Tuner.restore(...)` hint) are left out: the CLI says how to resume, with
`sweep run --resume`.

`ray.init` installs SIGTERM handlers of its own (a Python one that exits at once, a native one
that prints a native stack trace and aborts): `ray_init_keeps_stop_handlers` puts ours back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import TracebackType
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CtrlC:
    """`with CtrlC() as ctrl_c: tuner.fit()`, then `ctrl_c.pressed` says whether the user stopped
    it (Ctrl-C or SIGTERM) and `ctrl_c.exit_code` how the CLI exits. `CtrlC(tune=False)` guards
    plain work (the preparation of the trials, the analysis): either signal raises
    KeyboardInterrupt, and `pressed` tells it even where a library caught the KeyboardInterrupt on
    its way."""

    def __init__(self, tune: bool = True) -> None:
        self.tune = tune
        self.received: Optional[int] = None  # the first stop signal's number

    @property
    def pressed(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C (or no signal: Ray Tune returned early), 143 after SIGTERM."""
        return 128 + (self.received or signal.SIGINT)

    def __enter__(self) -> "CtrlC":
        if self.tune:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's handler would swallow the fact
            TUNE_LOGGER.addFilter(_tune_stop_lines)
        self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        first = not self.pressed
        if first:
            self.received = signum
        if self.tune and first:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends the run, saving its state one last time
        else:
            raise KeyboardInterrupt

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        _set_handlers(self._previous)
        if self.tune:
            TUNE_LOGGER.removeFilter(_tune_stop_lines)


@contextlib.contextmanager
def ray_init_keeps_stop_handlers() -> Iterator[None]:
    """Around `ray.init`: the Ctrl-C and SIGTERM handlers in place before it are put back after it."""
    kept = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        _set_handlers(kept)


def _set_handlers(handlers: dict[int, object]) -> None:
    """Install each signal's handler; one that was not installed from Python (None: Ray's native
    handler, when Ray started before the block) becomes the default, which ends the process quietly."""
    for number, handler in handlers.items():
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


TUNE_LOGGER = logging.getLogger("ray.tune.tune")


def _tune_stop_lines(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Stop signal received" in message or "Tuner.restore" in message)
