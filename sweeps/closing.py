"""How `sweep run` ends once its trials have: Ray shut down first, so the trials' last log lines
arrive before the closing lines rather than among them; the closing lines (the status table, the
analysis, where to look) guarded so that a Ctrl-C ends them without undoing the finished sweep;
the line naming the errored trials' tracebacks, and the one naming finished trials whose record
lost milestones that no checkpoint holds."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from record import states, storage
from record.experiment import load_experiment
from record.files import RAY_ERROR_FILE
from record.mirror import mirror_experiment

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


def lost_milestones(experiment: str) -> Optional[str]:
    """`N trials finished with milestones lost from metrics.jsonl that no checkpoint holds …` for an
    experiment (a path or URI) whose lost rows `record.repair` has put back where it could;
    None when every finished trial's record reaches its last step."""
    with storage.local_folder(experiment, seed=mirror_experiment, upload_changes=False) as folder:
        lacking = [trial for trial in load_experiment(folder).trials if trial.lacks_its_end]
    if not lacking:
        return None
    named = ", ".join(f"{t.trial_id} (ends at step {t.last_step or 0} of {t.total_steps})" for t in lacking)
    return (
        f"{states.trial_count(len(lacking))} finished "
        "with milestones lost from metrics.jsonl that no checkpoint holds (they cannot be measured again): "
        f"{named}"
    )
