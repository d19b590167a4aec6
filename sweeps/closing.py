"""How `sweep run` ends once its trials have: Ray shut down first, so the trials' last log lines
arrive before the closing lines rather than among them; the closing lines (the status table, the
analysis, where to look) guarded so that a Ctrl-C ends them without undoing the finished sweep;
and the line naming the errored trials' tracebacks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from record.files import RAY_ERROR_FILE

from .interrupt import CtrlC


@contextlib.contextmanager
def closing_lines() -> Iterator[CtrlC]:
    """`with closing_lines() as ctrl_c:` shuts Ray down, then runs the block; a Ctrl-C ends the
    block early, and `ctrl_c.pressed` says so even where a library swallowed the interrupt."""
    import ray

    ray.shutdown()
    with CtrlC(tune=False) as ctrl_c:
        try:
            yield ctrl_c
        except KeyboardInterrupt:
            pass


def errored_trials(results) -> Optional[str]:
    """`N of M trials errored; full tracebacks in …` for Ray Tune's results, None when none errored
    (after its retries)."""
    errored = [r for r in results if r.error]
    if not errored:
        return None
    tracebacks = ", ".join(str(Path(r.path) / RAY_ERROR_FILE) for r in errored)
    return f"{len(errored)} of {len(results)} trials errored; full tracebacks in {tracebacks}"
