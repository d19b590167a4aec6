"""Training checkpoints: model, EMA, optimiser, step and every RNG state, written atomically and
read back with `weights_only=True` (no pickled code runs on load)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import atomic_path
from .config import ConfigError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or tampered file
        raise ConfigError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    missing = {"step", "model", "ema", "optimizer", "rng", "config"} - set(state)
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {', '.join(sorted(missing))}")
    return state


def list_checkpoints(folder: Path) -> dict[int, Path]:
    """{step: path} of the checkpoints in a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def latest_checkpoint(folder: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(folder)
    return checkpoints[max(checkpoints)] if checkpoints else None
