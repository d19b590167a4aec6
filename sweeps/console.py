"""The console a user reads: each warning as one line, `warning: …`, without Python's file,
line number and source line (they point into this package, which the user did not write);
Ray's storage complaints as one line each, not a traceback; and Ray Tune's progress table in
the record's words, without the lines the product says better itself."""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from typing import Any, Callable

from diffusion_lib.milestone import STEP
from record import states
from record.files import one_line_error

# Ray's loggers that attach a traceback to a storage that did not answer (an outage Ray rides
# out by retrying, or that fails an attempt the trial is restarted from).
RAY_STORAGE_LOGGERS = (
    "ray.train._internal.storage",
    "ray.train._internal.syncer",
    "ray.tune.execution.experiment_state",
)


def one_line_warnings() -> None:
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


class OneLine(logging.Filter):
    """A record with a traceback as one line: its message and the exception's own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage().rstrip(': ')}: {one_line_error(f'{type(error).__name__}: {error}')}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def one_line_console() -> None:
    """This process's console in one-line messages: warnings, and Ray's storage complaints. Run
    in the driver and in every worker of the sweep (`worker_setup.set_up_worker`)."""
    one_line_warnings()
    for name in RAY_STORAGE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLine) for f in logger.filters):  # once, however many sweeps run here
            logger.addFilter(OneLine())
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint otherwise


def sweep_reporter(
    metric_columns: list[str], parameter_columns: list[str], total_steps: Callable[[dict[str, Any]], int]
):
    """Ray Tune's progress table (its CLIReporter, every 30 s) in the record's words, without the
    lines that would contradict the product's own end-of-run story. Ray calls a trial that the
    scheduler stopped TERMINATED, like one that finished: the table says `finished` or `stopped`
    (`total_steps` gives a trial's last step from its searched values). Left out: "Current best
    trial" (a trial's latest value, not its best), "Result logdir" (Ray's scratch folder, not the
    experiment), and the final table (the scheduler's last word on its rungs is kept): `sweep run`
    ends with its own table, then the best FID, the report and TensorBoard."""
    from ray.tune import CLIReporter

    class SweepReporter(CLIReporter):
        def report(self, trials, done: bool, *sys_info: str) -> None:
            ended = {
                str(trial): states.terminated_state(
                    (trial.last_result or {}).get(STEP.name, 0), total_steps(trial.config)
                )
                for trial in trials
                if trial.status == states.RAY_TERMINATED
            }
            lines = self._progress_str(trials, done, *sys_info).splitlines()
            if done:  # up to the table: the time, the scheduler's rungs, the resources
                lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Number of trials")), 0)]
            self._print(
                "\n".join(in_record_words(line, ended) for line in lines if not line.startswith(RAY_LINES_LEFT_OUT))
            )

    return SweepReporter(
        metric_columns=metric_columns,
        parameter_columns=parameter_columns,
        max_report_frequency=30,
        sort_by_metric=True,
        print_intermediate_tables=True,  # not left to Ray's global verbosity, which an earlier sweep set
    )


def in_record_words(line: str, ended: dict[str, str]) -> str:
    """A line of Ray's progress report with its TERMINATED trials (`ended`: name -> state) said as
    the record says them: each one's row, and their count in "Number of trials: …"."""
    if line.startswith("Number of trials"):
        counts = Counter(ended.values())
        return _TERMINATED_COUNT.sub(", ".join(f"{n} {state}" for state, n in sorted(counts.items())), line)
    cells = line.split("|")
    if len(cells) > 3 and cells[2].strip() == states.RAY_TERMINATED and cells[1].strip() in ended:
        cells[2] = cells[2].replace(states.RAY_TERMINATED, ended[cells[1].strip()].ljust(len(states.RAY_TERMINATED)))
    return "|".join(cells)


_TERMINATED_COUNT = re.compile(rf"\b\d+ {states.RAY_TERMINATED}\b")


RAY_LINES_LEFT_OUT = ("Current best trial:", "Result logdir:")
