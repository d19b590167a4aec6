"""The end of `sweep run`, once its trials have ended, in the order the user reads it: the
milestone rows a record lost put back, the status table, the analysis, where to look, what
errored; and the exit code. The guard around these lines is `sweeps.closing`'s."""

from __future__ import annotations

import sys

import typer

from analysis.status import show_status
from cli.lines import note
from record.repair import restore_lost_milestones
from sweeps.closing import closing_lines, errored_trials, lost_milestones


def end_of_sweep(spec, results, *, analyze: bool) -> int:
    """The closing lines of a sweep that ran to its end; the exit code (a Ctrl-C's, when one
    stopped them: the sweep itself stands, and `sweep analyze` writes the rest)."""
    with closing_lines() as ctrl_c:
        code = report_results(spec, results, analyze=analyze)
    if ctrl_c.pressed:
        note(f"analysis interrupted; the sweep itself finished: `sweep analyze {spec.experiment_path}` writes it")
        return ctrl_c.exit_code
    return code


def report_results(spec, results, *, analyze: bool) -> int:
    """Put back the milestone rows a trial's record lost (`record.repair`), print the outcome of a
    sweep and where to look, write the analysis; return the exit code: 1 when a trial errored
    (after its retries) and the spec fails on trial errors, or when a finished trial's record
    still lacks milestones, else 0. The outcome is `sweep status`'s table, in the record's words,
    so the run ends as status reads it."""
    for line in restore_lost_milestones(spec.experiment_path):
        note(line)
    show_status(spec.experiment_path, watching=False, interval=0.0, echo=typer.echo, warn=note, clear=False)
    if analyze:
        from analysis.report import analyze_location

        note("analysing: tables, plots, sample grids and the report")
        report, _ = analyze_location(spec.experiment_path, progress=sys.stderr.isatty())
        typer.echo(f"report: {report} (and report.html beside it)")
    typer.echo(f"TensorBoard: tensorboard --logdir {spec.experiment_path}")
    if errors := errored_trials(results):
        note(errors)
    if lost := lost_milestones(spec.experiment_path):
        note(lost)
    return 1 if (errors and spec.fail_on_trial_error) or lost else 0
