"""What every worker process of a sweep runs first: Ray's `worker_process_setup_hook`."""

from __future__ import annotations

from .console import one_line_console
from .process_exit import end_at_exit


def set_up_worker() -> None:
    """The console's one-line messages, and an exit without the interpreter's teardown."""
    one_line_console()
    end_at_exit()


# How `ray.init` is told to run it in every worker (Ray imports it there by name).
RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.{set_up_worker.__name__}"}
