"""`sweep status`: where a sweep stands, from its files alone (no Ray, torch or TensorBoard import),
so it works from another terminal or any machine that sees the experiment's storage, while the
sweep runs, after it ended, or after it was killed.

One line per trial: its state (`record.states`, which also says how states are decided), last
step of total, latest and best FID on the common basis (with the sample count), wall time; then
how many trials are in each state and the best configuration so far. A killed sweep (no summary;
its driver lock names a pid gone from this host, or nothing from Ray for
`record.states.STALE_AFTER_S`) is shown as interrupted, not running forever: the header says
why, and that `sweep run SPEC --resume` finishes it. Pending trials are the ones Ray has created
and not started: a searcher creates trials lazily, so later grid points or Optuna suggestions are
not listed until Ray creates them.

For a URI the small files status reads (no checkpoints) are mirrored locally, each with its
object's time (what freshness is judged by), and brought up to date before every refresh.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from diffusion_lib.config import ConfigError
from diffusion_lib.milestone import FID, FID_NUM_SAMPLES, STEP, WALL_TIME
from record import states, storage
from record.best import comparable_rows, is_finite_number
from record.experiment import Experiment, Trial, load_experiment, require_experiment
from record.files import SUMMARY_FILE
from record.mirror import mirror_experiment
from record.noise import rung_dynamics


@dataclass
class FidProgress:
    latest: float  # the latest FID on the common basis
    num_samples: Optional[int]
    best: float
    best_step: int


@dataclass
class StatusInfo:
    """What `sweep status` shows, computed from the experiment; `lines` renders it."""

    experiment: Experiment
    header: str

    @property
    def trials(self) -> list[Trial]:
        return self.experiment.trials

    @property
    def warnings(self) -> list[str]:
        return self.experiment.warnings

    def by_name(self) -> dict[str, Trial]:
        return {t.trial_id: t for t in self.trials}

    def fid_progress(self, trial: Trial) -> Optional[FidProgress]:
        rows = comparable_rows(trial.milestones, FID.name, self.experiment.basis)
        best = self.experiment.best(trial, FID.name)
        if not rows or best is None:
            return None
        return FidProgress(rows[-1][FID.name], rows[-1].get(FID_NUM_SAMPLES.name), best[FID.name], best[STEP.name])

    @property
    def lines(self) -> list[str]:
        dynamics = dynamics_line(self.experiment)
        return [self.header, *table(self), totals_line(self.trials), best_line(self), *([dynamics] if dynamics else [])]


def experiment_status(
    path: Path, *, now: Optional[float] = None, stale_after_s: float = states.STALE_AFTER_S
) -> StatusInfo:
    """Each trial's state read from an experiment directory. Raises ConfigError for a directory
    that is not an experiment."""
    path = Path(path)
    now = time.time() if now is None else now
    experiment = _load(path, now, stale_after_s)
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    if experiment.summary_mtime is not None:
        header = f"{path}: sweep ended ({SUMMARY_FILE} written {_ago(now - experiment.summary_mtime)} ago)"
    elif experiment.interrupted_mtime is not None:
        header = (
            f"{path}: sweep not running: interrupted (Ctrl-C or SIGTERM) "
            f"{_ago(now - experiment.interrupted_mtime)} ago; `sweep run SPEC --resume` finishes it"
        )
    elif experiment.driver_alive:
        header = f"{path}: sweep running ({_running_evidence(experiment, now)})"
    elif experiment.driver_alive is False:
        header = (
            f"{path}: sweep not running: {_stopped_evidence(experiment, now)} and no {SUMMARY_FILE}; "
            "`sweep run SPEC --resume` finishes it"
        )
    else:
        header = f"{path}: no Ray state yet; running or interrupted judged from each trial's file times"
    return StatusInfo(experiment, f"{stamp} {header}")


def _running_evidence(experiment: Experiment, now: float) -> str:
    """Why the sweep counts as running: Ray's latest state, and the driver holding the lock."""
    said = [
        f"Ray's driver wrote its state {_ago(now - experiment.ray_mtime)} ago"
        if experiment.ray_mtime is not None
        else "no Ray state yet"
    ]
    if experiment.driver is not None and experiment.driver.holding:
        said.append(f"its driver: {experiment.driver.driver.describe()}")
    return "; ".join(said)


def _stopped_evidence(experiment: Experiment, now: float) -> str:
    """Why the sweep counts as not running (it has no summary): its driver gave the lock back,
    its driver's pid no longer runs on this host, or Ray's state is stale."""
    record = experiment.driver
    if record is not None and not record.holding:
        return f"its driver ({record.driver.describe()}) ended without finishing the sweep"
    if record is not None and record.alive is False:
        return f"its driver ({record.driver.describe()}) no longer runs (killed or crashed?)"
    return f"nothing from Ray for {_ago(now - experiment.ray_mtime)} (killed or crashed?)"


def _load(path: Path, now: float, stale_after_s: float) -> Experiment:
    """load_experiment, read again when a file vanished under it (Ray replaces checkpoint folders)."""
    for attempt in range(3):
        try:
            return load_experiment(path, now=now, stale_after_s=stale_after_s)
        except OSError as err:
            if attempt == 2:
                raise ConfigError(f"{path}: cannot read the experiment ({err})") from err
            time.sleep(0.1)
    raise AssertionError("unreachable")


# ---- rendering ------------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def table(info: StatusInfo) -> list[str]:
    """The trial lines, in columns, each ending with its note (an error, a retry) if any."""
    if not info.trials:
        return ["(no trials yet)"]
    header = ("trial", "state", "step", "FID", "best FID (step)", "FID n", "wall")
    rows = [header]
    notes = [""]
    for t in info.trials:
        fid = info.fid_progress(t)
        wall = t.milestones[-1].get(WALL_TIME.name) if t.milestones else None
        rows.append(
            (
                t.trial_id,
                t.state,
                f"{'-' if t.last_step is None else t.last_step}/{'?' if t.total_steps is None else t.total_steps}",
                f"{fid.latest:.2f}" if fid else "-",
                f"{fid.best:.2f} ({fid.best_step})" if fid else "-",
                str(fid.num_samples) if fid and fid.num_samples is not None else "-",
                _duration(wall if is_finite_number(wall) else None),
            )
        )
        notes.append(t.note)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [
        ("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + note).rstrip() for r, note in zip(rows, notes)
    ]


def totals_line(trials: list[Trial]) -> str:
    counts = Counter(t.state for t in trials)
    shown = [s for s in states.STATES if s != states.INTERRUPTED or counts[s]]
    return f"totals: {states.trial_count(len(trials))}: " + ", ".join(f"{counts[s]} {s}" for s in shown)


def best_line(info: StatusInfo) -> str:
    """The trial with the lowest best FID on the common basis (sample count and reference)."""
    progress = [(t, info.fid_progress(t)) for t in info.trials]
    compared = [(t, p) for t, p in progress if p is not None]
    heading = "best" if info.experiment.summary_mtime is not None else "best so far"  # the sweep ended: its best
    if not compared:
        return f"{heading}: no FID yet"
    best, fid = min(compared, key=lambda tp: tp[1].best)
    searched = ", ".join(f"{k}={v}" for k, v in best.searched.items()) or "(no searched values)"
    left_out = sum(1 for t in info.trials if t.trial_id in info.experiment.off_basis and info.fid_progress(t) is None)
    return (
        f"{heading}: {best.trial_id}: {FID.name} {fid.best:.2f} at step {fid.best_step} ({fid.num_samples} samples); "
        f"{searched}" + (f" [{left_out} trial(s) with FIDs at other sample counts not compared]" if left_out else "")
    )


def dynamics_line(experiment: Experiment) -> Optional[str]:
    """How far rankings still moved after each milestone that enough trials went past
    (`record.noise.rung_dynamics`): the margin a cut there must allow beyond sampling noise."""
    curves = experiment.fid_curves()
    steps = sorted({step for curve in curves.values() for step in curve})
    measured = [d for d in (rung_dynamics(curves, step) for step in steps[:-1]) if d is not None]
    if not measured:
        return None
    shown = "; ".join(f"after step {d.rung:g}: {d.spread:.3g} ({d.num_trials} trials past it)" for d in measured)
    return f"rankings still move (FID, training dynamics beyond sampling): {shown}"


# ---- watching -------------------------------------------------------------------------------

CLEAR_SCREEN = "\x1b[H\x1b[2J"


def refresh(path: Path, echo: Callable[[str], None], warn: Callable[[str], None], *, clear: bool) -> None:
    """Print the status once, clearing the screen first when `clear` (stdout is a terminal)."""
    report = experiment_status(path)
    echo((CLEAR_SCREEN if clear else "") + "\n".join(report.lines))
    for warning in report.warnings:
        warn(f"warning: {warning}")


def watch(
    path: Path,
    interval: float,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    *,
    clear: bool,
    sleep: Optional[Callable[[float], None]] = None,
) -> None:
    """Refresh every `interval` seconds until Ctrl-C (which ends it normally). A directory that
    is not an experiment fails at once; a later read error is shown and retried."""
    sleep = sleep or time.sleep
    first = True
    try:
        while True:
            try:
                if not first and not clear:
                    echo("")
                refresh(path, echo, warn, clear=clear)
            except ConfigError as err:
                if first:
                    raise
                echo((CLEAR_SCREEN if clear else "") + f"error: {err} (retrying every {interval:g} s)")
            first = False
            sleep(interval)
    except KeyboardInterrupt:
        pass


def show_status(
    location: str,
    *,
    watching: bool,
    interval: float,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    clear: bool,
) -> None:
    """The status of the experiment at `location` (a path or URI), once or, when `watching`, every
    `interval` seconds until Ctrl-C. A URI is read through a temporary mirror, synced again
    before each refresh; the lines name the URI, not the mirror the user never asked for."""
    require_experiment(location)
    with storage.local_folder(location, seed=mirror_experiment, upload_changes=False) as folder:
        shown = storage.named_as(location, folder)

        def echo_shown(line: str) -> None:
            echo(shown(line))

        def warn_shown(line: str) -> None:
            warn(shown(line))

        def sleep_and_sync(seconds: float) -> None:
            time.sleep(seconds)
            if storage.is_uri(location):  # a local experiment is read afresh anyway
                try:
                    mirror_experiment(location, folder)
                except (ConfigError, OSError) as err:  # shown; the mirror stays as it was, retried next refresh
                    warn_shown(f"warning: {err}")

        if watching:
            watch(folder, interval, echo_shown, warn_shown, clear=clear, sleep=sleep_and_sync)
        else:
            refresh(folder, echo_shown, warn_shown, clear=clear)
