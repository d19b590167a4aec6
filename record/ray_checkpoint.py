"""The checkpoint Ray Tune restores a trial from, read from Ray's experiment state without Ray.

Ray keeps it in the trial's checkpoint manager, which it stores pickled (cloudpickle, as hex) in
the trial's run metadata. The latest report's `checkpoint_dir_name`, which Ray stores as JSON,
names the same folder as a rule, but Ray saves its state as it goes: a state saved between a
report and the registration of its checkpoint names a checkpoint that Ray will not restore.
So the pickle is read, every class and function it names replaced by a stand-in that keeps its
state and runs nothing: nothing of Ray is imported, and nothing in the file is executed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import PurePosixPath
from typing import Any, Optional


class _StandIn:
    """Whatever the pickle names: called, it keeps nothing; built, it keeps its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) else (state,)  # (dict state, slot state) or one dict
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update(part)


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type(name, (_StandIn,), {})


def restored_checkpoint(run_metadata: dict[str, Any]) -> Optional[str]:
    """The `checkpoint_*` folder Ray restores the trial from, as its checkpoint manager in
    `run_metadata` (a trial's run metadata in Ray's state) holds it; None when it holds none,
    or not in the form Ray 2.x stores it."""
    try:
        pickled = bytes.fromhex(run_metadata["checkpoint_manager"]["value"])
        manager = _StandInUnpickler(io.BytesIO(pickled)).load()
        path = vars(vars(vars(manager)["_latest_checkpoint_result"])["checkpoint"])["path"]
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None  # Ray's internal format, read defensively
    return PurePosixPath(path).name if isinstance(path, str) else None
