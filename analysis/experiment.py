"""Read what a sweep (or a single `sweep train` run) left on disk, tolerating what is missing.

An experiment directory holds `sweep.json` (metric, mode, searched keys; written by
`sweep run`), `experiment_summary.json` (final statuses, written when the sweep ends) and one
folder per trial with `trial.json`, `metrics.jsonl`, sample grids, TensorBoard events and
checkpoints (`checkpoint_*/step_*.pt` from Ray, `checkpoints/step_*.pt` from `sweep train`).
Anything unreadable becomes a warning, never a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffusion_lib.checkpoint import CHECKPOINT_DIR, list_checkpoints
from diffusion_lib.run_log import METRICS_FILE
from diffusion_lib.milestone import FID, STEP
from sweeps.layout import RAY_CHECKPOINT_GLOB, RAY_ERROR_FILE, SUMMARY_FILE, SWEEP_FILE, TRIAL_FILE, one_line_error, trial_label


@dataclass
class Trial:
    trial_id: str
    path: Path
    searched: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    milestones: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    status: str = "INCOMPLETE"
    error: Optional[str] = None

    @property
    def label(self) -> str:
        return trial_label(self.searched) or self.trial_id

    def best_milestone(self, metric: str, mode: str, *, checkpointed: bool = False) -> Optional[dict[str, Any]]:
        """The best milestone by `metric`; with `checkpointed`, the best whose checkpoint still
        exists (Ray keeps the best and the newest)."""
        rows = [r for r in self.milestones if is_finite_number(r.get(metric)) and (not checkpointed or r[STEP.name] in self.checkpoints)]
        if not rows:
            return None
        pick = min if mode == "min" else max
        return pick(rows, key=lambda r: r[metric])


@dataclass
class Experiment:
    path: Path
    metric: str = FID.name
    mode: str = "min"
    search: dict[str, dict] = field(default_factory=dict)  # sweep.json's {key: {distribution: args}}
    trials: list[Trial] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def searched_keys(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.trials for k in t.searched))

    def searched_on_log_scale(self, key: str) -> bool:
        """Drawn from a loguniform range, or a listed search spanning two decades or more."""
        dist = self.search.get(key) or self.search.get(key.split(".")[0]) or {}
        if "loguniform" in dist:
            return True
        values = [t.searched[key] for t in self.trials if is_finite_number(t.searched.get(key))]
        return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def is_finite_number(value: Any) -> bool:
    """A metric value that can be ranked and plotted (a missing or NaN value cannot)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _read_json(path: Path, warnings: list[str]) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        warnings.append(f"{path}: unreadable ({err}); ignored")
        return None


def _read_milestones(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get(STEP.name), int):
                raise ValueError("no integer step")
            rows.append(row)
        except ValueError as err:
            warnings.append(f"{path}:{number}: truncated or corrupt line skipped ({err})")
    return rows


def _find_checkpoints(trial_dir: Path) -> dict[int, Path]:
    """{step: path} in Ray's `checkpoint_*/` folders (a sweep trial) or `checkpoints/` (`sweep train`)."""
    found = {}
    for folder in [*sorted(trial_dir.glob(RAY_CHECKPOINT_GLOB)), trial_dir / CHECKPOINT_DIR]:
        found.update(list_checkpoints(folder))
    return found


def _status(trial: Trial, summary: Optional[dict]) -> tuple[str, Optional[str]]:
    """The trial's status and one-line error. The summary `sweep run` writes at the end is the
    truth (a resumed trial that finished is finished, whatever error.txt an earlier attempt left);
    without one (a sweep still running or killed), an error.txt means the trial errored."""
    recorded = (summary or {}).get("trials", {}).get(trial.trial_id)
    error_file = trial.path / RAY_ERROR_FILE
    total = trial.config.get("train.total_steps")
    last = trial.milestones[-1][STEP.name] if trial.milestones else 0
    if recorded and recorded.get("status") == "ERROR":
        return "ERROR", recorded.get("error") or "(no error message)"
    if not recorded and error_file.is_file():
        return "ERROR", one_line_error(error_file.read_text(errors="replace")) if error_file.stat().st_size else "(empty error.txt)"
    if total is not None and last >= total:
        return "TERMINATED", None
    if recorded:  # the sweep ended without this trial reaching its last step: ASHA stopped it
        return "STOPPED", None
    return "INCOMPLETE", None


def load_experiment(path: Path) -> Experiment:
    """Load an experiment directory, or a single run directory with metrics.jsonl."""
    path = Path(path)
    experiment = Experiment(path)
    sweep = _read_json(path / SWEEP_FILE, experiment.warnings) or {}
    experiment.metric = sweep.get("metric", experiment.metric)
    experiment.mode = sweep.get("mode", experiment.mode)
    experiment.search = sweep.get("search", {})
    summary = _read_json(path / SUMMARY_FILE, experiment.warnings)
    trial_dirs = [path] if (path / METRICS_FILE).is_file() else sorted(
        p for p in path.iterdir() if p.is_dir() and ((p / METRICS_FILE).is_file() or (p / TRIAL_FILE).is_file())
    )
    for trial_dir in trial_dirs:
        trial = Trial(trial_dir.name, trial_dir)
        params = _read_json(trial_dir / TRIAL_FILE, experiment.warnings) or {}
        trial.searched, trial.config = params.get("searched", {}), params.get("config", {})
        if not trial.config:
            experiment.warnings.append(f"{trial_dir}: no readable {TRIAL_FILE}; its config columns are empty")
        trial.milestones = _read_milestones(trial_dir / METRICS_FILE, experiment.warnings)
        trial.checkpoints = _find_checkpoints(trial_dir)
        trial.status, trial.error = _status(trial, summary)
        experiment.trials.append(trial)
    return experiment
