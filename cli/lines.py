"""How the command line speaks: a command's result on stdout, everything else a line on stderr."""

from __future__ import annotations

import typer


def note(line: str) -> None:
    """A line to the user on stderr, so that stdout holds the command's result alone."""
    typer.echo(line, err=True)
