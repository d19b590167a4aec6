"""The one vocabulary of trial states and the one rule that decides a trial's state from what its
experiment holds. The report, the tables, the Optuna study and `sweep status` all say these words.

    finished      ran to its last step
    stopped       stopped early by the scheduler (ASHA, racing) at a rung
    errored       failed, after its retries (its one-line error is kept)
    running       started and not ended, while the sweep is alive
    pending       created by Ray and not started yet (or waiting for a retry)
    interrupted   started and not ended, and the sweep is not alive (killed, or Ctrl-C)

The rule (`classify`; the first that applies):

- With a current summary (`experiment_summary.json`, written when `sweep run` ends; out of date
  once a later `sweep run --resume` rewrote sweep.json): errored there is **errored**; finished
  there, or the last step reached, is **finished**; a trial Ray's final state still calls
  running, pending or paused is **interrupted** — or **pending** if it never wrote a file; any
  other trial the sweep ended before its last step was **stopped**.
- Without one (the sweep is running, or was killed): Ray's newest state says ERROR →
  **errored**; TERMINATED → **finished** at the last step (recorded, or reported to Ray), else
  **stopped**; no Ray state and an `error.txt` → **errored**; the last step reached →
  **finished**; Ray says PENDING or PAUSED → **pending** (also a trial waiting for a retry after
  an error). Any other trial is **running** while the sweep is alive, else **interrupted**.
- A trial finished by the summary or by Ray's report of its last step whose metrics.jsonl stops
  short of it (rows lost: a torn or damaged line) is **finished**, with a note saying so:
  `sweep run SPEC --resume` puts the rows back from its checkpoints' copies
  (`record.repair`).
- Alive: the driver lock says it where it can (`record.driver_lock`): given back, the sweep is
  not alive; held, it is alive while the pid in it runs, checked on the driver's own host.
  Elsewhere, and for a sweep from before the lock: Ray's driver rewrites
  `experiment_state-*.json` at least every ~10 s while `sweep run` lives, so the sweep is alive
  while that file is younger than `STALE_AFTER_S`. Without either (Ray not started yet, a `sweep
  train` run directory), a trial is alive while a file in its folder is younger than
  `STALE_AFTER_S` or than twice its longest gap between milestones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FINISHED, STOPPED, ERRORED = "finished", "stopped", "errored"
RUNNING, PENDING, INTERRUPTED = "running", "pending", "interrupted"
STATES = (RUNNING, PENDING, FINISHED, STOPPED, ERRORED, INTERRUPTED)
ENDED_STATES = (FINISHED, STOPPED, ERRORED)  # what a summary records

STALE_AFTER_S = 300.0

# The note of a finished trial whose record lost rows (the rule's last point).
LACKS_ITS_END = (
    "its metrics.jsonl lost milestones up to its last step; "
    "`sweep run SPEC --resume` puts back those its checkpoints hold"
)

# Ray Tune's trial statuses, as its experiment state records them.
RAY_PENDING, RAY_RUNNING, RAY_PAUSED, RAY_TERMINATED, RAY_ERROR = "PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR"
RAY_STATUSES = (RAY_PENDING, RAY_RUNNING, RAY_PAUSED, RAY_TERMINATED, RAY_ERROR)
_RAY_WAITING = (RAY_PENDING, RAY_PAUSED)


def trial_count(n: int) -> str:
    """`1 trial`, `4 trials`: how every console line counts trials."""
    return f"{n} trial" if n == 1 else f"{n} trials"


def terminated_state(reached_step: int, total_steps: int) -> str:
    """A trial Ray calls TERMINATED, in these words: finished at its last step, else stopped."""
    return FINISHED if reached_step >= total_steps else STOPPED


@dataclass(frozen=True)
class Evidence:
    """What the experiment's files say about one trial."""

    recorded: Optional[str]  # its state in a current summary (one of ENDED_STATES), or None
    recorded_error: Optional[str]  # the summary's one-line error
    ray_status: Optional[str]  # Ray's status in its newest experiment state, or None
    error_line: Optional[str]  # the one-line error of its error.txt, or None
    reached_end: bool  # its last milestone is at its train.total_steps
    reported_end: bool  # Ray's state holds its report of its train.total_steps
    total_known: bool  # its train.total_steps is known (trial.json read)
    started: bool  # it wrote trial.json or a milestone
    has_milestone: bool
    alive: bool  # the sweep (or, without Ray's state, this trial) wrote something recently


def classify(evidence: Evidence) -> tuple[str, str]:
    """(state, note): the trial's state by the module's rule, and a note (its error, a retry)."""
    e = evidence
    finished_note = "" if e.reached_end or not e.total_known else LACKS_ITS_END
    if e.recorded is not None:
        if e.recorded == ERRORED:
            return ERRORED, e.recorded_error or "(no error message)"
        if e.recorded == FINISHED or e.reached_end:
            return FINISHED, finished_note
        if not e.started and e.ray_status != RAY_RUNNING:
            return PENDING, "never started"
        if e.ray_status in (RAY_RUNNING, *_RAY_WAITING):
            return INTERRUPTED, "the sweep was stopped before this trial ended"
        return STOPPED, ""
    if e.ray_status == RAY_ERROR or (e.ray_status is None and e.error_line is not None):
        return ERRORED, e.error_line or "(no error message)"
    if e.ray_status == RAY_TERMINATED:
        if e.reached_end or e.reported_end or not e.total_known:
            return FINISHED, finished_note
        return STOPPED, ""
    if e.reached_end:
        return FINISHED, ""
    if e.ray_status in _RAY_WAITING:
        return PENDING, f"retrying after an error: {e.error_line}" if e.error_line else ""
    if e.error_line is not None:
        note = f"retried after an error: {e.error_line}"
    elif not e.started:
        note = "starting"
    elif not e.has_milestone:
        note = "no milestone yet"
    else:
        note = ""
    return (RUNNING if e.alive else INTERRUPTED), note
