"""A stop signal that reached Ray's own processes on this machine too.

A signal to a whole process group or cgroup (systemd stopping a service, Slurm's `scancel`, `kill
-TERM -PGID`) reaches the daemons that `ray.init` started beside the driver. They ignore Ctrl-C's
SIGINT but die of SIGTERM. Ray Tune then saves its state, as at any stop, and waits on the dead
raylet to free its trials' resources: after a minute the driver dies of a native error, without
the interrupted sweep's lines, while the trials' workers, left without their raylet, train on
until they notice. `EndWhenLocalRayDies` ends such a sweep the way an interrupted one ends: the
orphaned workers stopped, then the caller's ending (its note, its line, its exit code).
"""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import Callable, NoReturn, Optional

import psutil

from .interrupt import CtrlC

RAY_DAEMONS = ("raylet", "gcs_server")  # the two a Tune run cannot end without
RAYLET_ENV = "RAY_RAYLET_PID"  # which raylet started a worker, in the worker's environment


class EndWhenLocalRayDies:
    """`with CtrlC() as ctrl_c, EndWhenLocalRayDies(ctrl_c, end): tuner.fit()`: once the user has
    stopped the sweep and the raylet or GCS this driver started has died, and Tune has not returned
    `grace_s` later, the workers of its raylet are killed and `end()` is called (from a watching
    thread: it must end the process). A driver that joined a cluster started no daemons: no watch."""

    def __init__(self, ctrl_c: CtrlC, end: Callable[[], NoReturn], grace_s: float = 2.0, poll_s: float = 0.5):
        self.ctrl_c, self.end, self.grace_s, self.poll_s = ctrl_c, end, grace_s, poll_s
        self.returned = threading.Event()

    def __enter__(self) -> "EndWhenLocalRayDies":
        daemons = local_ray_daemons()
        if daemons:
            threading.Thread(target=self._watch, args=(daemons,), name="local-ray-watch", daemon=True).start()
        return self

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        self.returned.set()

    def _watch(self, daemons: dict[psutil.Process, str]) -> None:
        while not self.returned.wait(self.poll_s):
            if not (self.ctrl_c.pressed and any(_gone(daemon) for daemon in daemons)):
                continue
            # Tune saved its state at the stop, well before: a raylet takes about 10 s to die of SIGTERM.
            if not self.returned.wait(self.grace_s):
                kill_workers_of([daemon.pid for daemon, name in daemons.items() if name == "raylet"])
                self.end()


def local_ray_daemons() -> dict[psutil.Process, str]:
    """The raylet and GCS server this process started (`ray.init` without a cluster to join), by name."""
    found = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # a child that ended meanwhile
            if (name := child.name()) in RAY_DAEMONS:
                found[child] = name
    return found


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by Ray
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def kill_workers_of(raylets: list[int]) -> None:
    """SIGKILL every process one of `raylets` started as a worker (its environment names it)."""
    wanted = {str(pid) for pid in raylets}
    for process in psutil.process_iter():
        try:
            if process.environ().get(RAYLET_ENV) in wanted:
                process.kill()
        except psutil.Error:  # ended meanwhile, or another user's
            continue
