"""What a run writes into its folder, by name; how its milestone rows are written, merged and read
back; whether a checkpoint file is whole. Kept free of torch so that readers of an experiment
(`sweep status`, the analysis, the resume plan) start fast.

    <run_dir>/
        metrics.jsonl               one JSON object per milestone (`milestone.MILESTONE_METRICS`),
                                    by step, rewritten whole at each milestone
        events.out.tfevents.*       TensorBoard scalars, sample grids and the HParams session
        events.out.tfevents.session_end   how the HParams session ended (a sweep's driver writes it)
        samples/step_NNNNNNN.png    the sample grid of each milestone
        checkpoints/step_NNNNNNN.pt the training state (`checkpoint.py`); a sweep trial keeps them
                                    in Ray's `checkpoint_*/` folders instead
        fid_floor.json              the FID floor (`FidFloor`); a sweep keeps one for all its
                                    trials in the experiment folder instead
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_path, atomic_write_text
from .milestone import STEP

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_GLOB = "step_*.pt"
EVENTS_GLOB = "events.out.tfevents.*"
# One fixed name, so a trial that errored and was resumed to its end has one status, the last.
SESSION_END_FILE = "events.out.tfevents.session_end"
FLOOR_FILE = "fid_floor.json"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def sample_grid_name(step: int) -> str:
    return f"step_{step:07d}.png"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a file named by `checkpoint_name`; None for any other name."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints in a folder, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        step = checkpoint_step(path.name)
        if step is not None:
            found[step] = path
    return dict(sorted(found.items()))


def checkpoint_damage(path: str | os.PathLike) -> Optional[str]:
    """Why the file at `path` is not a whole checkpoint, in a few words; None when it is whole.

    A checkpoint is torch.save's zip archive, each member with its CRC-32: an emptied or
    truncated file is no zip archive, and a changed byte fails its member's CRC, which
    torch.load does not check (it would load the damaged weights). The one test of a damaged
    checkpoint: `checkpoint.load_checkpoint` applies it, and, free of torch, so does the resume
    plan."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with zipfile.ZipFile(path) as archive:
            damaged_member = archive.testzip()
    except FileNotFoundError:
        return "no such file"
    except Exception as err:  # zipfile fails on a damaged archive with many exception types
        return f"not a whole zip archive ({type(err).__name__}: {err})"
    return f"damaged: {damaged_member} fails its CRC check" if damaged_member else None


def metrics_line(row: dict[str, Any]) -> str:
    """One milestone row as a metrics.jsonl line (a non-finite number becomes null)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite) + "\n"


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """A metrics.jsonl holding `rows`, written whole and atomically: a reader never sees a torn line."""
    atomic_write_text(path, "".join(metrics_line(row) for row in rows))


def merge_rows(*sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Milestone rows from several copies of a run's record (its metrics.jsonl, the copies its
    checkpoints hold, the rows just measured) as one record, by step: each step once, as the
    first source holding it recorded it. A milestone once recorded is kept as it was: measured
    again after a resume from an older checkpoint (the same values, training being bit-exact,
    but for wall_time_s), it is not added twice."""
    merged: dict[int, dict[str, Any]] = {}
    for rows in sources:
        for row in rows:
            merged.setdefault(row[STEP.name], row)
    return [merged[step] for step in sorted(merged)]


def read_metrics(path: Path, warnings: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """The milestone rows of a metrics.jsonl. A line that is not a row with an integer step (the
    torn last line of a run killed mid-write, a corrupt file) is skipped, and said in `warnings`."""
    rows = []
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return rows
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get(STEP.name), int):
                raise ValueError("no integer step")
            rows.append(row)
        except ValueError as err:
            if warnings is not None:
                warnings.append(f"{path}:{number}: truncated or corrupt line skipped ({err})")
    return rows


@dataclass(frozen=True)
class FloorPoint:
    """The FID of `num_samples` real images outside the reference, with its jackknife standard
    error; both None when fewer held-out images exist than the count needs."""

    num_samples: int
    fid: Optional[float]
    stderr: Optional[float]


@dataclass(frozen=True)
class FidFloor:
    """What real images score under a run's FID conditions (its reference, its sample counts):
    no generator can be expected below it, so a trial's FID reads as its distance above this."""

    reference: str  # the reference statistics file's name, as in every milestone row
    reference_images: int
    held_out: str  # where the real images come from, in words
    held_out_images: int  # how many there are
    held_out_fingerprint: str  # their content: a stored floor of other images is not reused
    points: tuple[FloorPoint, ...]

    def at(self, num_samples: int) -> Optional[FloorPoint]:
        return next((p for p in self.points if p.num_samples == num_samples), None)

    def sentence(self, num_samples: int) -> str:
        """The floor at a count, in words: its figure, or why there is none."""
        point = self.at(num_samples)
        if point is None:
            return f"no FID floor at {num_samples} samples was computed"
        reference = f"{self.reference_images}-image reference"
        if point.fid is None:
            return (
                f"no FID floor at {num_samples} samples: "
                f"only {self.held_out_images} real images outside the {reference} ({self.held_out}); "
                "lower fid.ref_num_images or add data"
            )
        return (
            f"real images ({self.held_out}) "
            f"score {point.fid:.4g} ± {point.stderr:.2g} at {num_samples} samples against this {reference}"
        )

    def write(self, folder: Path) -> None:
        with atomic_path(Path(folder) / FLOOR_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path, warnings: Optional[list[str]] = None) -> Optional["FidFloor"]:
        """The floor stored in a folder; None when there is none, or it is unreadable (said in `warnings`)."""
        path = Path(folder) / FLOOR_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "points": tuple(FloorPoint(**p) for p in raw["points"])})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as err:
            if warnings is not None:
                warnings.append(f"{path}: unreadable ({type(err).__name__}: {err}); ignored")
            return None
