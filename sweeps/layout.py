"""What an experiment directory holds, named by the code that writes it (`sweep run`, the
trainable); `analysis` and `sweep status` read these names from here. No Ray import.

    <storage>/<name>/
        sweep.json                  the spec's metric, mode and searched keys (sweep run)
        experiment_summary.json     each trial's final status and error (sweep run, at the end)
        fid_reference/*.npz         the FID reference statistics every trial uses (sweep run, at the start)
        events.out.tfevents.*.hparams   TensorBoard's HParams columns for all trials (sweep run)
        <trial_id>_<label>/         one folder per trial (Ray Tune), with
            trial.json              searched values, full config, node (the trainable)
            metrics.jsonl, events…, samples/   (diffusion_lib.run_log)
            checkpoint_*/step_*.pt  (Ray Tune, from the trainable's reports)
"""

from __future__ import annotations

import re
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "experiment_summary.json"
REFERENCE_DIR = "fid_reference"
TRIAL_FILE = "trial.json"  # the trial's searched values, full config and node (params.json is Ray's)
RAY_CHECKPOINT_GLOB = "checkpoint_*"
RAY_ERROR_FILE = "error.txt"


def trial_label(searched: dict[str, Any]) -> str:
    """`{"model.base_channels": 64, "optim.lr": 1e-4}` -> `base_channels=64,lr=0.0001`."""
    return ",".join(f"{k.split('.')[-1]}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in searched.items())


def one_line_error(text: str, limit: int = 300) -> str:
    """An exception as one readable line: `NonFiniteLossError: non-finite training loss …` from
    a traceback or Ray's wrapped error text, without terminal colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    if not lines:
        return "(no error message)"
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (named or lines)[-1][:limit]
