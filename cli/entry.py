"""The `sweep` executable: `cli.main`'s commands, ended without the interpreter's teardown.

A process that has loaded torch, Ray Tune and matplotlib spends seconds of CPU at exit freeing
modules it will never use again, after its work is done and its last line printed; a suite or a
sweep of many short commands pays that every time. So once a command has returned, what Python
does at exit that matters is done here — its threads finished, its atexit handlers run (Ray's
shutdown, logging's flush), its output flushed — and the process ends with `os._exit`.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from cli.main import app


def main() -> None:
    try:
        app(prog_name="sweep")
        code = 0
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    for thread in threading.enumerate():  # what the interpreter waits for before its atexit handlers
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(code: object) -> int:
    """The exit status Python gives `sys.exit(code)`: None is 0, an int is itself, anything else
    is printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
