"""Milestone rows a trial's metrics.jsonl lost (a torn or damaged line, a file overwritten), put
back from the copies of it that the trial's Ray checkpoints hold: each checkpoint stores the
record as it stood when the checkpoint was reported, so the newest one holds every row up to
it. `sweep run` does this as it closes, a resumed sweep included: a trial that ended is not run
again, so its checkpoints' copies are the only way back for its rows (a trial that is run again
merges them itself, `sweeps.trainable`). Rows no copy holds stay lost: the trial then reads
finished with a note (`states.LACKS_ITS_END`) and `sweep run` exits 1."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from diffusion_lib.milestone import STEP
from diffusion_lib.run_files import METRICS_FILE, merge_rows, read_metrics, write_metrics

from . import storage
from .files import RAY_CHECKPOINT_GLOB


def restore_lost_milestones(experiment: str) -> list[str]:
    """Put back the rows each trial of the experiment (a path or URI) lost; return a line for
    each trial whose rows were put back."""
    with storage.local_folder(experiment, seed=_records_and_their_copies) as folder:
        lines = []
        for trial_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            steps = restore_trial_rows(trial_dir)
            if steps:
                at = f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"
                lines.append(
                    f"trial {trial_dir.name}: its metrics.jsonl had lost the milestones at {at}; "
                    "put back from its checkpoints' copies"
                )
    return lines


def restore_trial_rows(trial_dir: Path) -> list[int]:
    """Put back into the trial's metrics.jsonl the rows it lacks and a checkpoint's copy holds
    (written whole, atomically, by step); return their steps."""
    record = trial_dir / METRICS_FILE
    recorded = read_metrics(record)
    copies = [read_metrics(copy) for copy in sorted(trial_dir.glob(f"{RAY_CHECKPOINT_GLOB}/{METRICS_FILE}"))]
    merged = merge_rows(recorded, *copies)
    lost = sorted({row[STEP.name] for row in merged} - {row[STEP.name] for row in recorded})
    if lost:
        write_metrics(record, merged)
    return lost


def _records_and_their_copies(location: str, folder: Path) -> None:
    """Seed a local folder of an experiment on a URI with what `restore_trial_rows` reads: each
    trial's metrics.jsonl and its checkpoints' copies."""
    import pyarrow.fs

    fs, root = storage.resolve(location)
    root = root.rstrip("/")
    wanted = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
        parts = [p for p in info.path[len(root) :].split("/") if p]
        in_trial = len(parts) == 2 or (len(parts) == 3 and fnmatch.fnmatch(parts[1], RAY_CHECKPOINT_GLOB))
        if info.type == pyarrow.fs.FileType.File and parts[-1] == METRICS_FILE and in_trial:
            wanted.append((folder.joinpath(*parts), info))
    storage.fetch_all(fs, wanted)
