"""What a run writes into its folder, by name, and how its milestone rows are read back. Kept free
of torch so that readers of an experiment (`sweep status`, the analysis) start fast.

    <run_dir>/
        metrics.jsonl               one JSON object per milestone (`milestone.MILESTONE_METRICS`)
        events.out.tfevents.*       TensorBoard scalars, sample grids and the HParams session
        samples/step_NNNNNNN.png    the sample grid of each milestone
        checkpoints/step_NNNNNNN.pt the training state (`checkpoint.py`); a sweep trial keeps them
                                    in Ray's `checkpoint_*/` folders instead
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from .milestone import STEP

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_GLOB = "step_*.pt"
EVENTS_GLOB = "events.out.tfevents.*"
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
