"""What every worker process of a sweep runs first: Ray's `worker_process_setup_hook`."""

from __future__ import annotations

import os

from .console import one_line_console
from .process_exit import end_at_exit, exit_when_an_exit_is_lost


def set_up_worker() -> None:
    """The console's one-line messages, and an exit without the interpreter's teardown, also
    where Ray's SIGTERM lands in a callback that cannot raise its exit."""
    one_line_console()
    end_at_exit()
    exit_when_an_exit_is_lost()


# How `ray.init` is told to run it in every worker (Ray imports it there by name).
RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.{set_up_worker.__name__}"}


def skip_prestarted_workers() -> None:
    """Before `ray.init` starts a local Ray: Ray pre-starts one worker per CPU for its first driver,
    but the job's `RUNTIME_ENV` makes it start workers of their own for the trials, so the
    pre-started ones sit idle and only cost each start about 2 s of CPU. The raylet that
    `ray.init` starts reads this from the environment; a user's own setting wins."""
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
