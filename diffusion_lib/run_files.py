"""What a run writes into its folder, by name, and how its milestone rows are read back. Kept free
of torch so that readers of an experiment (`sweep status`, the analysis) start fast.

    <run_dir>/
        metrics.jsonl               one JSON object per milestone (`milestone.MILESTONE_METRICS`)
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
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_path
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


def list_checkpoints(folder: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints in a folder, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def metrics_line(row: dict[str, Any]) -> str:
    """One milestone row as a metrics.jsonl line (a non-finite number becomes null)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite) + "\n"


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
