"""Ending a process that has loaded torch and Ray without the interpreter's teardown.

Once its work is done, such a process spends seconds of CPU freeing modules it will never use
again: `sweep` pays it in every command, a sweep in every trial worker, beside trials still
training. So what Python's exit does that matters is done first — other threads finished, the
atexit handlers run (Ray's own shutdown among them), the output flushed — and then `os._exit`.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """End this process with `code`, as Python's exit would, less its module teardown."""
    for thread in threading.enumerate():  # what the interpreter waits for before its atexit handlers
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_at_exit() -> None:
    """For a process whose exit is not in our hands (a Ray worker ends by `sys.exit` when its task
    loop does): the last atexit handler registered runs first, so this one runs the others, then
    ends the process. Its status is then 0, whatever the `sys.exit` that ended the task loop said
    (0 when the loop ends, 1 on SIGTERM)."""
    atexit.register(_end_here)


def _end_here() -> None:
    atexit.unregister(_end_here)
    exit_now(0)


def exit_when_an_exit_is_lost() -> None:
    """A `sys.exit` raised where Python cannot raise it (a weakref callback, a `__del__`, a garbage
    collector callback) is printed as "Exception ignored in: …" with its traceback, and the process
    goes on. A Ray worker's SIGTERM handler raises one wherever the signal lands, and Ray sends
    SIGTERM to every worker as it shuts down: the process ends instead, as the signal asked."""
    sys.unraisablehook = _exit_if_lost


def _exit_if_lost(unraisable) -> None:
    if isinstance(unraisable.exc_value, SystemExit):
        exit_now(0)  # the status `end_at_exit` gives the exit the signal meant
    sys.__unraisablehook__(unraisable)
