"""The `sweep` executable: `cli.main`'s commands, ended without the interpreter's teardown
(`sweeps.process_exit`): the work is done and the last line printed by then."""

from __future__ import annotations

import sys

from cli.main import app
from sweeps.process_exit import exit_now


def main() -> None:
    try:
        app(prog_name="sweep")
        code = 0
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    exit_now(code)


def exit_code(code: object) -> int:
    """The exit status Python gives `sys.exit(code)`: None is 0, an int is itself, anything else
    is printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
