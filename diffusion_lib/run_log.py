"""What a run writes for people and tools: `metrics.jsonl` (one JSON object per milestone),
TensorBoard scalars, sample grids and hparams, and PNG sample grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision.utils
from torch.utils.tensorboard import SummaryWriter

from .atomic import atomic_path, atomic_write_text
from .milestone import STEP

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The milestone rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLog:
    def __init__(self, run_dir: Path, resume_step: int):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        # Milestones after the checkpoint we resume from will be recomputed: drop their rows.
        kept = [r for r in read_metrics(self.metrics_path) if r.get(STEP.name, 0) <= resume_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        # purge_step hides TensorBoard events past the checkpoint written before a crash.
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=resume_step + 1 if resume_step else None)

    def milestone(self, row: dict[str, Any], grid: Optional[torch.Tensor]) -> None:
        """Append one milestone: a metrics.jsonl line, TensorBoard scalars and the sample grid."""
        step = row[STEP.name]
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        for key, value in row.items():
            if key != STEP.name and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if grid is not None:
            self.writer.add_image("samples", grid, step)
            save_png(grid, self.run_dir / SAMPLES_DIR / f"step_{step:07d}.png")
        self.writer.flush()

    def hparams(self, flat_config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's hyperparameters and summary metrics in TensorBoard's HParams view."""
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config.items()}
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_grid(images_uint8: torch.Tensor) -> torch.Tensor:
    """A square-ish grid (3, H, W) in [0, 1] from uint8 images."""
    nrow = max(1, int(math.sqrt(images_uint8.shape[0])))
    return torchvision.utils.make_grid(images_uint8.float().div(255), nrow=nrow, padding=2)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """A (3, H, W) image in [0, 1] as a PNG, written atomically."""
    with atomic_path(path) as tmp:
        torchvision.utils.save_image(grid, tmp, format="png")
