"""`sweep train`: one run outside a sweep, in its own folder, resumed when trained again there.

Outside a sweep nothing else writes what a sweep's launcher and callbacks write for each trial:
the FID floor under the run's conditions, TensorBoard's HParams columns (on the first session
only) and how the HParams session ended, so a single run reads in TensorBoard as a trial does."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .build import create_trainer
from .config import RunConfig
from .metrics.fid import fid_floor
from .run_log import write_hparams_config, write_session_end


def train_single_run(config: RunConfig, out: Path, *, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Train the run in `out` to its last step, resuming from its newest checkpoint there; return
    the final summary. `say` tells the FID floor and a resume, a line each."""
    trainer = create_trainer(config, out, progress=progress)
    if config.fid.enabled and not config.fid.reference:  # a reference of the user's holds unknown images
        floor = fid_floor(config, trainer.data, trainer.features, trainer.fid_reference, out)
        for point in floor.points:
            say(f"FID floor: {floor.sentence(point.num_samples)}")
    if trainer.step:
        say(f"resuming {out} from step {trainer.step}")
    else:
        write_hparams_config(out, list(config.flat()))
    try:
        summary = trainer.fit()
    except Exception:  # TensorBoard's HParams Status: Failure (a Ctrl-C leaves it Unknown, to resume)
        write_session_end(out, succeeded=False)
        raise
    write_session_end(out, succeeded=True)
    return summary
