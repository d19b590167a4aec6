"""The experiment's own files, by name, each with its typed writer and reader. Writers take a
local path or a URI (through `storage`) and write whole files atomically; readers take a local
folder (a URI is read through a local mirror, `record.mirror`) and turn an unreadable file into
a warning, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable, Optional, TypeVar

from diffusion_lib.config import RunConfig, flatten
from diffusion_lib.run_files import checkpoint_step

from . import storage

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "experiment_summary.json"
INTERRUPTED_FILE = "experiment_interrupted.json"
TRIAL_FILE = "trial.json"  # the trial's searched values, full config and node (params.json is Ray's)
REFERENCE_DIR = "fid_reference"
ANALYSIS_DIR = "analysis"  # what `sweep analyze` writes, unless told another folder
RAY_STATE_GLOB = "experiment_state-*.json"  # Ray Tune's driver rewrites it every ~10 s while it runs
RAY_CHECKPOINT_GLOB = "checkpoint_*"
RAY_ERROR_FILE = "error.txt"
STOPPED_FILE = "stopped_early.json"  # why the racing scheduler stopped the trial
DRIVER_LOCK_FILE = "driver.lock"  # the `sweep run` driving the experiment now (record.driver_lock)
DRIVER_LOCK_BREAK_FILE = "driver.lock.break"  # held for an instant while a dead driver's lock is cleared
DRIVER_ENDED_FILE = "driver.ended"  # the lock of the last driver, renamed when it ended

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")


def one_line_error(text: str, limit: int = 300) -> str:
    """An exception as one readable line: `NonFiniteLossError: non-finite training loss …` from
    a traceback or Ray's wrapped error text, without terminal colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    if not lines:
        return "(no error message)"
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (named or lines)[-1][:limit]


def searched_values(point: dict[str, Any]) -> dict[str, Any]:
    """A trial's point in the search space as dotted run-config keys: a searched section's
    mapping spelled out (`{"loss": {"weighting": "constant"}}` -> `loss.weighting`), and the
    mapping of an arm (a search key that is not a section) merged in, its keys dotted already."""
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    flat = {}
    for key, value in point.items():
        if isinstance(value, dict) and key not in sections:
            flat.update(value)
        else:
            flat.update(flatten({key: value}))
    return flat


def trial_label(searched: dict[str, Any]) -> str:
    """`{"model.base_channels": 64, "optim.lr": 1e-4}` -> `base_channels=64,lr=0.0001`."""
    return ",".join(f"{k.split('.')[-1]}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in searched.items())


def read_json(path: Path, warnings: list[str]) -> Optional[Any]:
    """A JSON file's content; None when it is missing, or unreadable (said in `warnings`)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        warnings.append(f"{path}: unreadable ({err}); ignored")
        return None


@dataclass
class SweepFile:
    """What a sweep measures and searches, written when `sweep run` starts. `search` holds one
    distribution per searched dotted key, `{kind: args}` as in the spec (a searched section
    is recorded as a `choice` per key its variants set)."""

    metric: str
    mode: str
    search: dict[str, dict[str, list]] = field(default_factory=dict)

    def write(self, experiment: str) -> None:
        storage.write_text(storage.join(experiment, SWEEP_FILE), json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, experiment: Path, warnings: list[str]) -> Optional["SweepFile"]:
        raw = read_json(Path(experiment) / SWEEP_FILE, warnings)
        if not isinstance(raw, dict):
            return None
        return cls(raw.get("metric", ""), raw.get("mode", "min"), raw.get("search") or {})


@dataclass
class TrialOutcome:
    """How one trial ended, as the summary records it (`states.ENDED_STATES`)."""

    state: str
    error: Optional[str] = None  # one line
    traceback: Optional[str] = None  # where the full traceback is (a path or URI)


@dataclass
class Summary:
    """Each trial's outcome, written once when `sweep run` ends (not after Ctrl-C: it would be stale)."""

    trials: dict[str, TrialOutcome]

    def write(self, experiment: str) -> None:
        data = {"trials": {name: asdict(outcome) for name, outcome in self.trials.items()}}
        storage.write_text(storage.join(experiment, SUMMARY_FILE), json.dumps(data, indent=1))

    @classmethod
    def read(cls, experiment: Path, warnings: list[str]) -> Optional["Summary"]:
        path = Path(experiment) / SUMMARY_FILE
        raw = read_json(path, warnings)
        if raw is None:
            return None
        try:
            trials = {name: TrialOutcome(**record) for name, record in raw["trials"].items()}
        except (KeyError, TypeError, AttributeError) as err:
            warnings.append(f"{path}: unreadable ({type(err).__name__}: {err}); ignored")
            return None
        return cls(trials)


@dataclass
class Interruption:
    """Written when `sweep run` is stopped by Ctrl-C or SIGTERM (instead of a summary): the driver
    is gone, on purpose, whatever the age of Ray's last state. A later `sweep run --resume`
    supersedes it, and removes it when it writes the summary."""

    message: str

    def write(self, experiment: str) -> None:
        storage.write_text(storage.join(experiment, INTERRUPTED_FILE), json.dumps(asdict(self), indent=1))

    @staticmethod
    def remove(experiment: str) -> None:
        storage.remove_file(storage.join(experiment, INTERRUPTED_FILE))


@dataclass
class TrialFile:
    """A trial's searched values and full config (dotted keys), and the Ray node it ran on."""

    searched: dict[str, Any]
    config: dict[str, Any]
    node_id: Optional[str] = None

    def write(self, trial_dir: Path) -> None:
        storage.write_text(Path(trial_dir) / TRIAL_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, trial_dir: Path, warnings: list[str]) -> Optional["TrialFile"]:
        raw = read_json(Path(trial_dir) / TRIAL_FILE, warnings)
        if not isinstance(raw, dict):
            return None
        return cls(raw.get("searched") or {}, raw.get("config") or {}, raw.get("node_id"))


@dataclass
class StoppedEarly:
    """Why the racing scheduler stopped a trial at a rung: the step and its console line (the
    trial's value, the keep threshold's, and the margin the cut needed)."""

    step: int
    reason: str

    def write(self, trial_dir: str) -> None:
        """Into the trial's folder, a path or URI."""
        storage.write_text(storage.join(trial_dir, STOPPED_FILE), json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, trial_dir: Path, warnings: list[str]) -> Optional["StoppedEarly"]:
        raw = read_json(Path(trial_dir) / STOPPED_FILE, warnings)
        if not isinstance(raw, dict) or not isinstance(raw.get("reason"), str):
            return None
        return cls(int(raw.get("step") or 0), raw["reason"])


def read_error_line(trial_dir: Path) -> Optional[str]:
    """The one-line error of a trial's error.txt; None when there is none."""
    try:
        text = (Path(trial_dir) / RAY_ERROR_FILE).read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return f"({RAY_ERROR_FILE} unreadable)"
    return one_line_error(text) if text.strip() else f"(empty {RAY_ERROR_FILE})"


CheckpointPath = TypeVar("CheckpointPath", bound=PurePath)


def resume_order(checkpoints: Iterable[CheckpointPath], restored_folder: Optional[str]) -> list[CheckpointPath]:
    """The trainer checkpoints (`<trial>/checkpoint_*/step_*.pt`) a resumed trial tries, in turn,
    until one is whole: the one in the `checkpoint_*` folder Ray restores (its latest report's),
    then those in the folders Ray wrote before it, newest step first. A folder written after
    it holds a report Ray never recorded (the driver was gone) and is not used. When Ray's
    state does not name a folder (`restored_folder` None): every checkpoint, newest step first.
    Ray numbers its folders in report order, so their names sort in it."""
    by_step = sorted(checkpoints, key=lambda path: checkpoint_step(path.name) or 0, reverse=True)
    if restored_folder is None:
        return by_step
    restored = [path for path in by_step if path.parent.name == restored_folder]
    return restored + [path for path in by_step if path.parent.name < restored_folder]
