"""The console a user reads: each warning as one line, `warning: …`, without Python's file,
line number and source line (they point into this package, which the user did not write);
Ray's storage complaints as one line each, not a traceback; and Ray Tune's progress table
without the lines the product says better itself."""

from __future__ import annotations

import logging
import warnings

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
    in the driver and, as Ray's `worker_process_setup_hook`, in every worker of the sweep."""
    one_line_warnings()
    for name in RAY_STORAGE_LOGGERS:
        logging.getLogger(name).addFilter(OneLine())
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint otherwise


def sweep_reporter(metric_columns: list[str], parameter_columns: list[str]):
    """Ray Tune's progress table (its CLIReporter, every 30 s) without the lines that would
    contradict the product's own end-of-run story: "Current best trial" (a trial's latest value,
    not its best), "Result logdir" (Ray's scratch folder, not the experiment), and the final table
    (Ray calls early-stopped trials TERMINATED; the scheduler's last word on its rungs is kept):
    `sweep run` ends with its own table, in the record's words (finished, stopped, errored),
    then the best FID, the report and TensorBoard."""
    from ray.tune import CLIReporter

    class SweepReporter(CLIReporter):
        def report(self, trials, done: bool, *sys_info: str) -> None:
            lines = self._progress_str(trials, done, *sys_info).splitlines()
            if done:  # up to the table: the time, the scheduler's rungs, the resources
                lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Number of trials")), 0)]
            self._print("\n".join(line for line in lines if not line.startswith(RAY_LINES_LEFT_OUT)))

    return SweepReporter(
        metric_columns=metric_columns,
        parameter_columns=parameter_columns,
        max_report_frequency=30,
        sort_by_metric=True,
    )


RAY_LINES_LEFT_OUT = ("Current best trial:", "Result logdir:")
