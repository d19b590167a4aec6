"""`sweep status`: where a sweep stands, from its files alone (no Ray import), so it works from
another terminal or any machine that sees the experiment's storage, while the sweep runs,
after it ended, or after it was killed.

One line per trial: status, last step of total, latest and best FID (with the sample count they
were computed from), wall time; then how many trials are in each status and the best
configuration so far.

Statuses and how they are decided (first rule that applies):

- With a current `experiment_summary.json` (written when `sweep run` ends; it is out of date
  once a later `sweep run --resume` rewrote sweep.json): an ERROR there is **errored**; the last
  step reached is **finished**; a trial Ray's final state still calls running, pending or
  paused is **interrupted** (the sweep was stopped with Ctrl-C: Ray saves that state before it
  stops the trials, and the summary then calls every unfailed trial TERMINATED); one that never
  wrote a file is **pending** (never started); any other trial the sweep ended before its last
  step was **stopped early** (by ASHA).
- Without one (the sweep is running, or was killed): Ray's newest `experiment_state-*.json`
  says ERROR → **errored**; TERMINATED → **finished** at the last step, else **stopped early**;
  no Ray state and an `error.txt` → **errored**; the last step reached → **finished**; Ray says
  PENDING or PAUSED → **pending** (also a trial waiting for a retry after an error). Any other
  trial is **running** while the sweep is alive, else **interrupted**.
- Alive: Ray's driver rewrites `experiment_state-*.json` at least every ~10 s while `sweep run`
  lives, so the sweep is alive while that file is younger than `stale_after_s` (5 minutes).
  Without that file (Ray not started yet, a `sweep train` run directory), a trial is alive
  while a file in its folder is younger than `stale_after_s` or than twice its longest gap
  between milestones, whichever is longer (milestones can be far apart).

A killed sweep (no summary, nothing written for 5 minutes) is thus shown as **interrupted**, not
running forever: the header says how long nothing has changed and that `sweep run SPEC
--resume` finishes it. Pending trials are the ones Ray has created and not started: a searcher
creates trials lazily, so later grid points or Optuna suggestions are not listed until Ray
creates them. Ray's state file is Ray's internal format; if it cannot be read (a newer Ray, a
copy caught mid-write) it is left out with a warning and the rules above fall back to files.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from analysis.experiment import Experiment, Trial, is_finite_number, load_experiment
from diffusion_lib.config import ConfigError, flatten
from diffusion_lib.milestone import FID, FID_NUM_SAMPLES, STEP, WALL_TIME
from diffusion_lib.run_log import METRICS_FILE
from sweeps.layout import RAY_ERROR_FILE, SUMMARY_FILE, SWEEP_FILE, TRIAL_FILE, one_line_error

RAY_STATE_GLOB = "experiment_state-*.json"  # Ray Tune's driver rewrites it every ~10 s while it runs
STALE_AFTER_S = 300.0
TOTAL_STEPS_KEY = "train.total_steps"

RUNNING, STOPPED, FINISHED, ERRORED, PENDING, INTERRUPTED = "running", "stopped early", "finished", "errored", "pending", "interrupted"
STATUSES = (RUNNING, PENDING, FINISHED, STOPPED, ERRORED, INTERRUPTED)
_RAY_WAITING = ("PENDING", "PAUSED")
_RAY_STATUSES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")


@dataclass
class FidProgress:
    latest: float
    num_samples: Optional[int]
    best: float
    best_step: int


@dataclass
class TrialStatus:
    name: str
    status: str
    step: Optional[int] = None
    total_steps: Optional[int] = None
    fid: Optional[FidProgress] = None
    wall_time_s: Optional[float] = None
    searched: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class StatusReport:
    path: Path
    trials: list[TrialStatus]
    header: str
    warnings: list[str]

    @property
    def lines(self) -> list[str]:
        return [self.header, *table(self.trials), totals_line(self.trials), best_line(self.trials)]

    def by_name(self) -> dict[str, TrialStatus]:
        return {t.name: t for t in self.trials}


def fid_progress(rows: list[dict[str, Any]]) -> Optional[FidProgress]:
    """The latest FID and the best so far. Only FIDs from the same number of generated samples are
    compared (FID's bias depends on the count, so a lower FID from more samples is not a better
    model): "best" is over the rows whose `val/fid_num_samples` equals the latest FID row's."""
    with_fid = [r for r in rows if is_finite_number(r.get(FID.name))]
    if not with_fid:
        return None
    latest = with_fid[-1]
    count = latest.get(FID_NUM_SAMPLES.name)
    best = min((r for r in with_fid if r.get(FID_NUM_SAMPLES.name) == count), key=lambda r: r[FID.name])
    return FidProgress(latest[FID.name], count, best[FID.name], best[STEP.name])


def experiment_status(path: Path, *, now: Optional[float] = None, stale_after_s: float = STALE_AFTER_S) -> StatusReport:
    """Each trial's status (rules in the module docstring) read from an experiment directory.
    Raises ConfigError for a directory that is not an experiment."""
    path = Path(path)
    now = time.time() if now is None else now
    if not path.is_dir():
        raise ConfigError(f"{path}: no such experiment directory")
    experiment = _load(path)
    warnings = list(experiment.warnings)
    ray_mtime, ray_trials = _read_ray_state(path, warnings)
    summary, summary_mtime = _read_summary(path, warnings)
    if not experiment.trials and not (path / SWEEP_FILE).is_file() and not ray_trials:
        raise ConfigError(f"{path}: not an experiment directory (no {SWEEP_FILE} and no trial folders with {TRIAL_FILE} or {METRICS_FILE})")

    if ray_mtime is not None:  # sweep.json is the driver's too: written as each `sweep run` starts
        ray_mtime = max(ray_mtime, _mtime(path / SWEEP_FILE) or 0.0)
    driver_alive = None if ray_mtime is None else now - ray_mtime <= stale_after_s
    loaded = {t.trial_id: t for t in experiment.trials}
    names = sorted({*loaded, *(ray_trials or {}), *(summary or {})})
    trials = []
    for name in names:
        trial = loaded.get(name) or Trial(name, path / name)
        ray = (ray_trials or {}).get(name)
        alive = driver_alive if driver_alive is not None else _trial_alive(trial, now, stale_after_s)
        trials.append(_trial_status(trial, ray and ray["status"], (summary or {}).get(name), alive))
        if not trials[-1].searched and ray:
            trials[-1].searched = ray["searched"]

    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    if summary is not None:
        header = f"{path}: sweep ended ({SUMMARY_FILE} written {_ago(now - summary_mtime)} ago)"
    elif driver_alive:
        header = f"{path}: sweep running (Ray's driver wrote its state {_ago(now - ray_mtime)} ago)"
    elif driver_alive is False:
        header = (f"{path}: sweep not running: nothing from Ray for {_ago(now - ray_mtime)} and no {SUMMARY_FILE} "
                  "(killed or crashed?); `sweep run SPEC --resume` finishes it")
    else:
        header = f"{path}: no Ray state yet; running or interrupted judged from each trial's file times"
    return StatusReport(path, trials, f"{stamp} {header}", warnings)


def status_lines(path: Path, **kwargs) -> list[str]:
    """The lines `sweep status` prints (warnings aside)."""
    return experiment_status(path, **kwargs).lines


def _load(path: Path) -> Experiment:
    """load_experiment, read again when a file vanished under it (Ray replaces checkpoint folders)."""
    for attempt in range(3):
        try:
            return load_experiment(path)
        except OSError as err:
            if attempt == 2:
                raise ConfigError(f"{path}: cannot read the experiment ({err})") from err
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _trial_status(trial: Trial, ray: Optional[str], recorded: Optional[dict], alive: bool) -> TrialStatus:
    rows = trial.milestones
    total = trial.config.get(TOTAL_STEPS_KEY)
    total = total if isinstance(total, int) else None
    last = rows[-1][STEP.name] if rows else None
    reached_end = total is not None and last is not None and last >= total
    started = bool(rows) or (trial.path / TRIAL_FILE).is_file()
    error_file = trial.path / RAY_ERROR_FILE
    has_error_file = error_file.is_file()
    note = ""

    if recorded is not None:  # the sweep ended and its summary is current
        if recorded.get("status") == "ERROR":
            status, note = ERRORED, recorded.get("error") or "(no error message)"
        elif reached_end:
            status = FINISHED
        elif not started and ray != "RUNNING":
            status, note = PENDING, "never started"
        elif ray in ("RUNNING", *_RAY_WAITING):
            status, note = INTERRUPTED, "the sweep was stopped before this trial ended"
        else:
            status = STOPPED
    elif ray == "ERROR" or (ray is None and has_error_file):
        status, note = ERRORED, _error_line(error_file)
    elif ray == "TERMINATED":
        status = FINISHED if reached_end or total is None else STOPPED
    elif reached_end:
        status = FINISHED
    elif ray in _RAY_WAITING:
        status = PENDING
        if has_error_file:
            note = f"retrying after an error: {_error_line(error_file)}"
    else:
        status = RUNNING if alive else INTERRUPTED
        if has_error_file:
            note = f"retried after an error: {_error_line(error_file)}"
        elif not started:
            note = "starting"
        elif not rows:
            note = "no milestone yet"
    wall = rows[-1].get(WALL_TIME.name) if rows else None
    return TrialStatus(trial.trial_id, status, last, total, fid_progress(rows), wall if is_finite_number(wall) else None, dict(trial.searched), note)


def _error_line(error_file: Path) -> str:
    try:
        text = error_file.read_text(errors="replace")
    except OSError:
        return "(error.txt unreadable)"
    return one_line_error(text) if text.strip() else "(empty error.txt)"


def _read_summary(path: Path, warnings: list[str]) -> tuple[Optional[dict[str, dict]], Optional[float]]:
    """The summary's {trial: record} and its time, or None when there is none or it predates the
    sweep.json of a later `sweep run --resume` (that run has not ended yet)."""
    file = path / SUMMARY_FILE
    try:
        mtime = file.stat().st_mtime
        data = json.loads(file.read_text())
        trials = data["trials"]
        if not isinstance(trials, dict):
            raise TypeError("'trials' is not an object")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.append(f"{file}: unreadable ({err}); ignored")
        return None, None
    if (_mtime(path / SWEEP_FILE) or 0.0) > mtime:
        return None, None
    return {name: record if isinstance(record, dict) else {} for name, record in trials.items()}, mtime


def _read_ray_state(path: Path, warnings: list[str]) -> tuple[Optional[float], Optional[dict[str, dict]]]:
    """(time of the newest `experiment_state-*.json`, {trial folder: {"status", "searched"}}).
    The time is the sweep's heartbeat whatever the content; the content is Ray's internal format,
    read defensively: anything unexpected leaves the trials out (None) with a warning."""
    files = []
    for file in path.glob(RAY_STATE_GLOB):
        try:
            files.append((file.stat().st_mtime, file))
        except OSError:
            continue
    if not files:
        return None, None
    mtime, newest = max(files)
    try:
        trials = {}
        for entry in json.loads(newest.read_text())["trial_data"]:
            state = json.loads(entry[0])
            status, trial_id = state["status"], state["trial_id"]
            if status not in _RAY_STATUSES or not isinstance(trial_id, str):
                raise ValueError(f"unexpected trial status {status!r}")
            name = state.get("relative_logdir") or trial_id
            config = state.get("config")
            searched = flatten(config) if isinstance(config, dict) else {}
            trials[str(name)] = {"status": status, "searched": {k: v for k, v in searched.items() if not isinstance(v, dict)}}
        return mtime, trials
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        warnings.append(f"{newest}: Ray's experiment state unreadable ({type(err).__name__}: {err}); pending trials not listed")
        return mtime, None


def _mtime(file: Path) -> Optional[float]:
    try:
        return file.stat().st_mtime
    except OSError:
        return None


def _trial_alive(trial: Trial, now: float, stale_after_s: float) -> bool:
    """Without Ray's state: a file in the trial's folder changed within `stale_after_s`, or
    within twice the longest gap between its milestones."""
    newest = None
    try:
        with os.scandir(trial.path) as entries:
            for entry in entries:
                try:
                    newest = max(newest or 0.0, entry.stat().st_mtime)
                except OSError:
                    continue
    except OSError:
        return False
    if newest is None:
        return False
    times = [r[WALL_TIME.name] for r in trial.milestones if is_finite_number(r.get(WALL_TIME.name))]
    longest_gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return now - newest <= max(stale_after_s, 2 * longest_gap)


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


def table(trials: list[TrialStatus]) -> list[str]:
    """The trial lines, in columns, each ending with its note (an error, a retry) if any."""
    if not trials:
        return ["(no trials yet)"]
    header = ("trial", "status", "step", "FID", "best FID (step)", "FID n", "wall")
    rows = [header]
    notes = [""]
    for t in trials:
        fid = t.fid
        rows.append((
            t.name,
            t.status,
            f"{'-' if t.step is None else t.step}/{'?' if t.total_steps is None else t.total_steps}",
            f"{fid.latest:.2f}" if fid else "-",
            f"{fid.best:.2f} ({fid.best_step})" if fid else "-",
            str(fid.num_samples) if fid and fid.num_samples is not None else "-",
            _duration(t.wall_time_s),
        ))
        notes.append(t.note)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + note).rstrip() for r, note in zip(rows, notes)]


def totals_line(trials: list[TrialStatus]) -> str:
    counts = Counter(t.status for t in trials)
    shown = [s for s in STATUSES if s != INTERRUPTED or counts[s]]
    return f"totals: {len(trials)} trials: " + ", ".join(f"{counts[s]} {s}" for s in shown)


def best_line(trials: list[TrialStatus]) -> str:
    """The trial with the lowest best FID among those whose FIDs share the common sample count
    (the count most trials' latest FIDs have; on a tie the larger count)."""
    with_fid = [t for t in trials if t.fid]
    if not with_fid:
        return "best so far: no FID yet"
    counts = Counter(t.fid.num_samples for t in with_fid)
    common = max(counts, key=lambda n: (counts[n], n if n is not None else -1))
    best = min((t for t in with_fid if t.fid.num_samples == common), key=lambda t: t.fid.best)
    searched = ", ".join(f"{k}={v}" for k, v in best.searched.items()) or "(no searched values)"
    left_out = len(with_fid) - counts[common]
    return (f"best so far: {best.name}: {FID.name} {best.fid.best:.2f} at step {best.fid.best_step} ({common} samples); {searched}"
            + (f" [{left_out} trial(s) with FIDs at other sample counts not compared]" if left_out else ""))


# ---- watching -------------------------------------------------------------------------------

CLEAR_SCREEN = "\x1b[H\x1b[2J"


def refresh(path: Path, echo: Callable[[str], None], warn: Callable[[str], None], *, clear: bool) -> None:
    """Print the status once, clearing the screen first when `clear` (stdout is a terminal)."""
    report = experiment_status(path)
    echo((CLEAR_SCREEN if clear else "") + "\n".join(report.lines))
    for warning in report.warnings:
        warn(f"warning: {warning}")


def watch(path: Path, interval: float, echo: Callable[[str], None], warn: Callable[[str], None], *,
          clear: bool, sleep: Optional[Callable[[float], None]] = None) -> None:
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
