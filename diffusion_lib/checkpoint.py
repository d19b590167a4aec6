"""Training checkpoints: what they hold, how they are written and read, which config keys may
change on resume, and which are kept.

A checkpoint holds the model, EMA, optimiser, every RNG state, the run's progress and its
config; it is written atomically and read back with `weights_only=True` (no pickled code runs
on load). A run resumed from it continues bit for bit as if never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .atomic import atomic_path
from .config import TOTAL_STEPS_KEY, ConfigError, RunConfig, flatten
from .ema import EMA
from .run_files import checkpoint_damage, checkpoint_name, list_checkpoints

_KEYS = {"step", "wall_time_s", "best", "final_fid", "model", "ema", "optimizer", "rng", "config"}
# Keys that may change when a run is resumed; anything else would change the trajectory.
RESUMABLE_KEYS = (TOTAL_STEPS_KEY, "train.device", "train.compile", "data.root", "data.download")
RESUMABLE_SECTIONS = ("eval.", "fid.", "curvature.")


@dataclass
class RunProgress:
    """How far a run has come: saved with every checkpoint."""

    step: int = 0
    wall_time_s: float = 0.0
    best: Optional[tuple[float, int]] = None  # (val/fid, step) of the best milestone so far
    final_fid: Optional[float] = None


def save_checkpoint(
    folder: Path,
    progress: RunProgress,
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: RunConfig,
) -> Path:
    """Write the checkpoint of `progress.step` into `folder`; return its path."""
    state = {
        "step": progress.step,
        "wall_time_s": progress.wall_time_s,
        "best": list(progress.best) if progress.best else None,
        "final_fid": progress.final_fid,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train": generator.get_state(),
        },
        "config": config.to_dict(),
    }
    path = Path(folder) / checkpoint_name(progress.step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state, checked to be whole and to hold every key `save_checkpoint` writes."""
    damage = checkpoint_damage(path)
    if damage is not None:
        raise ConfigError(f"{path}: not a readable checkpoint ({damage})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or tampered file
        raise ConfigError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    missing = _KEYS - set(state) if isinstance(state, dict) else _KEYS
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {', '.join(sorted(missing))}")
    return state


def checkpoint_config(state: dict[str, Any]) -> RunConfig:
    """The run config a checkpoint was trained with."""
    return RunConfig.from_dict(state["config"])


def restore_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: RunConfig,
) -> RunProgress:
    """Load a checkpoint into the run's parts, refusing one trained with a different trajectory."""
    state = load_checkpoint(path)
    saved = RunConfig().flat() | flatten(state["config"])
    now = config.flat()
    changed = [
        k
        for k, v in now.items()
        if saved.get(k) != v and k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_SECTIONS)
    ]
    if changed:
        raise ConfigError(
            f"{path}: cannot resume from this checkpoint, it was trained with different "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in changed)
            + "; use a new --out directory"
        )
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    generator.set_state(state["rng"]["train"])
    return RunProgress(
        state["step"], state["wall_time_s"], tuple(state["best"]) if state["best"] else None, state["final_fid"]
    )


def prune_checkpoints(folder: Path, progress: RunProgress) -> None:
    """Keep the newest checkpoint (to resume from) and the best-FID one (for analysis)."""
    keep = {progress.step, progress.best[1] if progress.best else progress.step}
    for step, path in list_checkpoints(folder).items():
        if step not in keep:
            path.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(folder)
    return checkpoints[max(checkpoints)] if checkpoints else None
