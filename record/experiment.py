"""An experiment read back from its files: its sweep file, each trial's config, milestones,
checkpoints and state (`states.classify`), and the common FID basis (`best`). Works on a sweep's
folder while it runs, after it ended or was killed, and on a single `sweep train` run folder.
Anything unreadable becomes a warning, never a traceback; a folder that is not an experiment is
a ConfigError."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffusion_lib.config import EVAL_SEED_KEY, TOTAL_STEPS_KEY, ConfigError
from diffusion_lib.milestone import FID, STEP, WALL_TIME
from diffusion_lib.run_files import CHECKPOINT_DIR, METRICS_FILE, FidFloor, FloorPoint, list_checkpoints, read_metrics

from . import states, storage
from .best import Row, best_milestone, common_basis, comparable_rows, is_finite_number
from .driver_lock import DriverRecord, recorded_driver
from .files import (
    INTERRUPTED_FILE,
    RAY_CHECKPOINT_GLOB,
    RAY_STATE_GLOB,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRIAL_FILE,
    Summary,
    SweepFile,
    TrialFile,
    read_error_line,
    searched_values,
    trial_label,
)
from .noise import Measurement
from .ray_checkpoint import restored_checkpoint


@dataclass
class Trial:
    trial_id: str
    path: Path
    searched: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    milestones: list[Row] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    state: str = states.PENDING
    note: str = ""  # its one-line error when errored; a retry, "no milestone yet", … otherwise
    # The checkpoint_* folder Ray's state restores it from (that of its latest report); None when
    # Ray's state does not say.
    ray_checkpoint: Optional[str] = None

    @property
    def label(self) -> str:
        return trial_label(self.searched) or self.trial_id

    @property
    def error(self) -> Optional[str]:
        return self.note if self.state == states.ERRORED else None

    @property
    def total_steps(self) -> Optional[int]:
        total = self.config.get(TOTAL_STEPS_KEY)
        return total if isinstance(total, int) else None

    @property
    def last_step(self) -> Optional[int]:
        return self.milestones[-1][STEP.name] if self.milestones else None

    @property
    def lacks_its_end(self) -> bool:
        """Finished (it reported its last step) while its metrics.jsonl stops short of it."""
        total = self.total_steps
        return self.state == states.FINISHED and total is not None and (self.last_step or 0) < total


@dataclass
class Experiment:
    path: Path
    metric: str = FID.name
    mode: str = "min"
    search: dict[str, dict[str, list]] = field(default_factory=dict)  # sweep.json's {dotted key: {kind: args}}
    trials: list[Trial] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary_mtime: Optional[float] = None  # when a current summary was written (the sweep ended)
    ray_mtime: Optional[float] = None  # Ray's newest experiment state (the sweep's heartbeat)
    driver: Optional[DriverRecord] = None  # the `sweep run` its driver lock names (record.driver_lock)
    driver_alive: Optional[bool] = None  # None: neither the lock nor Ray's state tells
    interrupted_mtime: Optional[float] = None  # when the current run was stopped by Ctrl-C
    floor: Optional[FidFloor] = None  # what real images score under the sweep's FID conditions

    def __post_init__(self) -> None:
        # The FID basis most trials share, and the trials with FIDs on another basis (not ranked).
        self.basis, self.off_basis = common_basis({t.trial_id: t.milestones for t in self.trials})

    @property
    def searched_keys(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.trials for k in t.searched))

    def best(self, trial: Trial, metric: Optional[str] = None, *, checkpointed: bool = False) -> Optional[Row]:
        """The trial's best milestone by `metric` (default: the sweep's) on the common FID basis;
        with `checkpointed`, the best whose checkpoint was kept (Ray keeps the best and newest)."""
        metric = metric or self.metric
        steps = set(trial.checkpoints) if checkpointed else None
        return best_milestone(
            trial.milestones, metric, self.mode if metric == self.metric else "min", self.basis, steps=steps
        )

    def fid_curves(self) -> dict[str, dict[int, Measurement]]:
        """Each trial's FIDs on the common basis by step, with their noise (`record.noise`)."""
        return {
            trial.trial_id: {
                row[STEP.name]: Measurement.from_row(row, FID.name, trial.config.get(EVAL_SEED_KEY))
                for row in comparable_rows(trial.milestones, FID.name, self.basis)
            }
            for trial in self.trials
        }

    def floor_point(self) -> Optional[FloorPoint]:
        """The floor under the common FID basis (its sample count and reference), when stored."""
        if self.floor is None or self.basis is None or self.basis[1] != self.floor.reference:
            return None
        return self.floor.at(self.basis[0])

    def searched_on_log_scale(self, key: str) -> bool:
        """Drawn from a loguniform range, or a listed search spanning two decades or more."""
        if "loguniform" in self.search.get(key, {}):
            return True
        values = [t.searched[key] for t in self.trials if is_finite_number(t.searched.get(key))]
        return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def require_experiment(location: str) -> None:
    """Refuse a location that cannot hold an experiment before any reader starts: a URI whose
    storage is unreachable (`storage.validate_storage`), a local path that is no folder."""
    if storage.is_uri(location):
        storage.validate_storage(location, "EXPERIMENT")
    elif not Path(location).is_dir():
        raise ConfigError(f"{location}: no such experiment directory")


def load_experiment(
    path: Path, *, now: Optional[float] = None, stale_after_s: float = states.STALE_AFTER_S
) -> Experiment:
    """Read an experiment folder (or a single run folder with metrics.jsonl); `now` and
    `stale_after_s` decide whether the sweep is alive (`states`)."""
    path = Path(path)
    now = time.time() if now is None else now
    if not path.is_dir():
        raise ConfigError(f"{path}: no such experiment directory")
    warnings: list[str] = []
    sweep = SweepFile.read(path, warnings)
    ray_mtime, ray_trials = _read_ray_state(path, warnings)
    summary = _current_summary(path, warnings)
    trial_dirs = (
        [path]
        if (path / METRICS_FILE).is_file()
        else sorted(
            p for p in path.iterdir() if p.is_dir() and ((p / METRICS_FILE).is_file() or (p / TRIAL_FILE).is_file())
        )
    )
    if not trial_dirs and sweep is None and not ray_trials:
        raise ConfigError(
            f"{path}: "
            f"not an experiment directory (no {SWEEP_FILE} and no trial folders with {TRIAL_FILE} or {METRICS_FILE})"
        )

    driver = recorded_driver(path, warnings)
    driver_alive = driver.alive if driver is not None else None  # known on the driver's host, or once it ended
    if ray_mtime is not None:  # sweep.json is the driver's too: written as each `sweep run` starts
        ray_mtime = max(ray_mtime, _mtime(path / SWEEP_FILE) or 0.0)
        if driver_alive is None:  # no lock, or one held on another host: judged by Ray's heartbeat
            driver_alive = now - ray_mtime <= stale_after_s
    interrupted_mtime = _mtime(path / INTERRUPTED_FILE)
    if summary is not None or (interrupted_mtime or 0.0) < (_mtime(path / SWEEP_FILE) or 0.0):
        interrupted_mtime = None  # the sweep ended, or a later `sweep run --resume` has started
    if interrupted_mtime is not None:
        driver_alive = False

    read = {d.name: _read_trial(d, warnings) for d in trial_dirs}
    trials = []
    for name in sorted({*read, *(ray_trials or {}), *(summary.trials if summary else {})}):
        trial = read.get(name) or Trial(
            name, path / name, searched=(ray_trials or {}).get(name, {}).get("searched", {})
        )
        ray_trial = (ray_trials or {}).get(name, {})
        trial.ray_checkpoint = ray_trial.get("checkpoint")
        outcome = summary.trials.get(name) if summary else None
        alive = driver_alive if driver_alive is not None else _trial_alive(trial, now, stale_after_s)
        evidence = states.Evidence(
            recorded=outcome.state if outcome else None,
            recorded_error=outcome.error if outcome else None,
            ray_status=ray_trial.get("status"),
            error_line=read_error_line(trial.path),
            reached_end=_at_or_past(trial.last_step, trial.total_steps),
            reported_end=_at_or_past(ray_trial.get("step"), trial.total_steps),
            total_known=trial.total_steps is not None,
            started=bool(trial.milestones) or (trial.path / TRIAL_FILE).is_file(),
            has_milestone=bool(trial.milestones),
            alive=alive,
        )
        trial.state, trial.note = states.classify(evidence)
        trials.append(trial)
    return Experiment(
        path,
        metric=sweep.metric if sweep and sweep.metric else FID.name,
        mode=sweep.mode if sweep else "min",
        search=sweep.search if sweep else {},
        trials=trials,
        warnings=warnings,
        summary_mtime=_mtime(path / SUMMARY_FILE) if summary else None,
        ray_mtime=ray_mtime,
        driver=driver,
        driver_alive=driver_alive,
        interrupted_mtime=interrupted_mtime,
        floor=FidFloor.read(path, warnings),
    )


def _read_trial(trial_dir: Path, warnings: list[str]) -> Trial:
    trial = Trial(trial_dir.name, trial_dir)
    trial_file = TrialFile.read(trial_dir, warnings)
    if trial_file is None:
        warnings.append(f"{trial_dir}: no readable {TRIAL_FILE}; its config columns are empty")
    else:
        trial.searched, trial.config = trial_file.searched, trial_file.config
    trial.milestones = read_metrics(trial_dir / METRICS_FILE, warnings)
    for folder in [*sorted(trial_dir.glob(RAY_CHECKPOINT_GLOB)), trial_dir / CHECKPOINT_DIR]:
        trial.checkpoints.update(list_checkpoints(folder))
    return trial


def _at_or_past(step: Optional[int], total_steps: Optional[int]) -> bool:
    return step is not None and total_steps is not None and step >= total_steps


def _current_summary(path: Path, warnings: list[str]) -> Optional[Summary]:
    """The summary, unless it predates the sweep.json of a later `sweep run --resume` (that run
    has not ended yet)."""
    summary = Summary.read(path, warnings)
    if summary is None or (_mtime(path / SWEEP_FILE) or 0.0) > (_mtime(path / SUMMARY_FILE) or 0.0):
        return None
    return summary


def unreadable_ray_state(path: Path) -> Optional[str]:
    """Why the latest of Ray's experiment states in `path` (the one `Tuner.restore` reads) is not
    JSON, as a byte-full disk can leave it; None when it is, or when there is none. Ray's restore
    would log the failure, go on without its trials and start one with an empty config."""
    newest = max(path.glob(RAY_STATE_GLOB), default=None)  # experiment_state-YYYY-MM-DD_HH-MM-SS.json
    if newest is None:
        return None
    try:
        json.loads(newest.read_text())
    except (OSError, ValueError) as err:
        return f"Ray's experiment state {newest.name} is unreadable ({type(err).__name__}: {err})"
    return None


def _read_ray_state(path: Path, warnings: list[str]) -> tuple[Optional[float], Optional[dict[str, dict]]]:
    """(time of the newest `experiment_state-*.json`, {trial folder: {"status", "searched",
    "checkpoint", "step"}}). The time is the sweep's heartbeat whatever the content. The content
    is read from the file of the latest driver session, named by its start time (a resumed run
    copies the earlier session's file back within microseconds of writing its own, so
    modification times cannot tell them apart; Ray restores from the latest by name too); it is
    Ray's internal format, read defensively: anything unexpected leaves the trials out (None)
    with a warning. "checkpoint" and "step" are the checkpoint folder and step of the trial's
    latest report (`_latest_report`), the checkpoint Ray restores the trial from."""
    files = []
    for file in path.glob(RAY_STATE_GLOB):
        try:
            files.append((file.stat().st_mtime, file))
        except OSError:
            continue
    if not files:
        return None, None
    mtime = max(stamp for stamp, _ in files)
    newest = max(file for _, file in files)  # experiment_state-YYYY-MM-DD_HH-MM-SS.json: latest by name
    try:
        trials = {}
        for entry in json.loads(newest.read_text())["trial_data"]:
            state = json.loads(entry[0])
            status, trial_id = state["status"], state["trial_id"]
            if status not in states.RAY_STATUSES or not isinstance(trial_id, str):
                raise ValueError(f"unexpected trial status {status!r}")
            name = state.get("relative_logdir") or trial_id
            config = state.get("config")
            searched = searched_values(config) if isinstance(config, dict) else {}
            trials[str(name)] = {
                "status": status,
                "searched": {k: v for k, v in searched.items() if not isinstance(v, dict)},
                **_latest_report(entry[1]),
            }
        return mtime, trials
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        warnings.append(
            f"{newest}: Ray's experiment state unreadable ({type(err).__name__}: {err}); pending trials not listed"
        )
        return mtime, None


def _latest_report(run_metadata: str) -> dict[str, Any]:
    """{"checkpoint": the checkpoint_* folder Ray restores the trial from, "step": the step of
    its latest report}, from a trial's run metadata (the second half of its entry in Ray's
    state), each left out when the metadata does not hold it. The checkpoint is the one Ray's
    checkpoint manager holds (`record.ray_checkpoint`); where that cannot be read, the latest
    report's, which names the same folder but for a report whose checkpoint Ray has not taken yet
    (every report of a trial carries one: `sweeps.trainable`)."""
    try:
        metadata = json.loads(run_metadata)
        last_result = metadata.get("last_result") or {}
    except (ValueError, TypeError, AttributeError):
        return {}
    checkpoint = restored_checkpoint(metadata) or last_result.get("checkpoint_dir_name")
    report = {"checkpoint": checkpoint, "step": last_result.get(STEP.name)}
    valid = {"checkpoint": str, "step": int}
    return {key: value for key, value in report.items() if isinstance(value, valid[key])}


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
