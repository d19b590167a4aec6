"""The console a user reads: each warning as one line, `warning: …`, without Python's file,
line number and source line (they point into this package, which the user did not write)."""

from __future__ import annotations

import warnings


def one_line_warnings() -> None:
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"
