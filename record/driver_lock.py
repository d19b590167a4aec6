"""One `sweep run` drives an experiment at a time: the driver lock.

`sweep run` (`sweeps.runner.run_sweep`) takes the lock before Ray starts and before it writes
anything else, and gives it back however it ends (its end, an error, Ctrl-C). A second `sweep
run` of the same experiment is refused while the first lives, in one line naming the first's
host and pid (the CLI looks before it loads torch and Ray: `refuse_if_driven`): two drivers
would both train every trial and both write every record.

The lock is the file `driver.lock` in the experiment folder, created exclusively (O_CREAT |
O_EXCL: of two drivers starting at once, exactly one creates it), holding the driver's host, pid
and start. Given back, it is renamed `driver.ended` (a rename needs no free space, so a full disk
cannot keep it), which tells `sweep status` that no driver runs. A killed driver (kill -9, a
crashed machine) leaves `driver.lock` behind: on the same host a pid that no longer runs is a
dead driver, and the next `sweep run` takes over, saying so; a driver on another host cannot be
checked from here, so its lock is refused with the lock's path, to delete once that driver is
known to be gone.

On cloud storage (a URI) an object store has no exclusive create: the lock is an object written
after looking for one, which refuses a driver started later but not one started at the same
moment; `sweep run` says so in a warning.

`sweep status` reads the same files (`recorded_driver`): a held lock whose process runs on this
host is a live driver, one whose process is gone a killed driver, `driver.ended` a driver that
ended.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Optional

from diffusion_lib.config import ConfigError

from . import storage
from .files import DRIVER_ENDED_FILE, DRIVER_LOCK_BREAK_FILE, DRIVER_LOCK_FILE

_TRIES = 5  # looks at a lock that changes under us (created, cleared, given back) before giving up
_PAUSE_S = 0.05  # between two looks: a lock is caught between its creation and its content for microseconds


@dataclass(frozen=True)
class Driver:
    """A `sweep run` process: its host, its pid and when it took the lock. From /proc where there
    is one: `process_start` (its start in clock ticks since boot) tells it from a later process
    that got the same pid, and `pid_namespace` tells a container that shares the host's name (host
    networking) but not its pids."""

    host: str
    pid: int
    started: float  # Unix time
    process_start: Optional[int] = None
    pid_namespace: Optional[str] = None

    @classmethod
    def this_process(cls) -> "Driver":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, time.time(), _process_start(pid), _pid_namespace())

    def is_running(self) -> Optional[bool]:
        """Whether this driver's process still runs; None on another host (or in another container's
        pids), where nothing here can tell."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace():
            return None
        try:
            os.kill(self.pid, 0)  # signal 0 sends nothing: it asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        return self.process_start is None or _process_start(self.pid) in (None, self.process_start)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {since}"


@dataclass(frozen=True)
class DriverRecord:
    """The driver an experiment's files name: the one holding its lock (`holding`), else the last
    one that gave it back."""

    driver: Driver
    holding: bool

    @property
    def alive(self) -> Optional[bool]:
        """Whether a driver drives the experiment now: not once the lock was given back; for a held
        lock, whether its process runs (None on another host)."""
        return self.driver.is_running() if self.holding else False


def recorded_driver(experiment: Path, warnings: list[str]) -> Optional[DriverRecord]:
    """The driver an experiment folder names; None when it names none (a sweep from before the
    lock, a `sweep train` run) or its lock is unreadable (said in `warnings`)."""
    for name, holding in ((DRIVER_LOCK_FILE, True), (DRIVER_ENDED_FILE, False)):
        path = Path(experiment) / name
        try:
            return DriverRecord(_read(str(path)), holding)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as err:
            warnings.append(f"{path}: unreadable ({err}); whether a driver runs is judged from file times")
            return None
    return None


class DriverLock:
    """This process's hold on an experiment: `with DriverLock.take(experiment, say):` … given back
    when the block ends, however it ends."""

    def __init__(self, experiment: str, driver: Driver, say: Callable[[str], None]):
        self.experiment = experiment
        self.driver = driver
        self.say = say
        self.path = storage.join(experiment, DRIVER_LOCK_FILE)

    @classmethod
    def take(cls, experiment: str, say: Callable[[str], None]) -> "DriverLock":
        """Take the lock of `experiment` (a path or URI), making its folder when there is none.
        Raises ConfigError naming the driver that holds it, or naming the lock when it cannot be
        read or cleared."""
        lock = cls(experiment, Driver.this_process(), say)
        if storage.is_uri(experiment):
            say(
                f"warning: {lock.path}: cloud storage has no exclusive create, "
                "so this lock refuses a `sweep run` of the experiment started later, not one started at the same moment"
            )
        for _ in range(_TRIES):
            if _create(lock.path, lock.driver):
                return lock
            try:
                holder = _dead_holder(experiment)
            except FileNotFoundError:
                continue  # given back between the two looks
            say(f"warning: {lock.path}: its driver ({holder.describe()}) no longer runs; this run takes over")
            _retire(experiment, holder)
        raise ConfigError(
            f"{lock.path}: could not take the lock "
            "(other `sweep run`s kept taking it, or one was killed while clearing it: "
            f"then delete {storage.join(experiment, DRIVER_LOCK_BREAK_FILE)}); run again"
        )

    def give_back(self) -> None:
        """Rename the lock `driver.ended`: no driver runs now. Nothing when the lock is gone (its
        folder removed) or is not this driver's; a failure is a warning, never the run's error."""
        try:
            if _read(self.path) == self.driver:
                storage.move(self.path, storage.join(self.experiment, DRIVER_ENDED_FILE))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            self.say(f"warning: {self.path}: not given back ({type(err).__name__}: {err})")

    def __enter__(self) -> "DriverLock":
        return self

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        self.give_back()


def refuse_if_driven(storage_root: str, experiment: str) -> None:
    """Refuse, as `DriverLock.take` would, an experiment (a path or URI in `storage_root`) whose
    lock a running driver holds, or one on another host, or an unreadable lock; without taking the
    lock, so that `sweep run` says so before it loads torch and Ray. A bad storage is refused first
    (`storage.validate_storage`); a free lock passes, and so does one whose driver is dead (`take`
    takes that over)."""
    storage.validate_storage(storage_root)
    try:
        _dead_holder(experiment)
    except OSError:
        pass


def _dead_holder(experiment: str) -> Driver:
    """The driver holding the experiment's lock, when its process no longer runs. Raises
    ConfigError when a running driver, or one on another host, holds it, or it is unreadable;
    FileNotFoundError when there is no lock."""
    lock = storage.join(experiment, DRIVER_LOCK_FILE)
    try:
        holder = _read(lock)
    except ValueError as err:
        raise ConfigError(
            f"{lock}: unreadable driver lock ({err}); if no `sweep run` drives this experiment, delete it and run again"
        ) from None
    running = holder.is_running()
    if running is None:
        raise ConfigError(
            f"{experiment} is driven by a `sweep run` on another host ({holder.describe()}); "
            f"if no `sweep run` of it runs there any more, delete {lock} and run again"
        )
    if running:
        raise ConfigError(
            f"{experiment} is driven by another `sweep run` ({holder.describe()}); wait for it to end, or stop it first"
        )
    return holder


def _create(lock: str, driver: Driver) -> bool:
    """Create `lock` holding `driver`; False when it exists already. Locally an exclusive create
    (atomic: of two processes exactly one succeeds); on an object store a look, then a write."""
    content = json.dumps(asdict(driver))
    if storage.is_uri(lock):
        if storage.exists(lock):
            return False
        storage.write_text(lock, content)
        return True
    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies: others may read it
    except FileExistsError:
        return False
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    except BaseException:
        os.unlink(lock)  # a lock without its driver would hold the experiment for no one
        raise
    finally:
        os.close(fd)
    return True


def _read(lock: str) -> Driver:
    """The driver a lock names. FileNotFoundError when there is none; ValueError when its content
    stays unreadable over a few looks (a lock is caught between its creation and its content)."""
    for attempt in range(_TRIES):
        text = storage.read_text(lock)
        try:
            raw = json.loads(text)
            start, namespace = raw.get("process_start"), raw.get("pid_namespace")
            return Driver(
                str(raw["host"]),
                int(raw["pid"]),
                float(raw["started"]),
                None if start is None else int(start),
                None if namespace is None else str(namespace),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if attempt == _TRIES - 1:
                raise ValueError(f"not a driver lock: {type(err).__name__}: {err}") from None
            time.sleep(_PAUSE_S)
    raise AssertionError("unreachable")


def _retire(experiment: str, dead: Driver) -> None:
    """Rename a dead driver's lock `driver.ended` (that driver has ended), unless the lock changed
    meanwhile. Two drivers taking over at once take turns through a second, short-lived lock (as
    Mercurial breaks a stale lock): otherwise one could rename the lock the other had just taken.
    When that one is taken, or the lock is unreadable, the caller looks again."""
    lock = storage.join(experiment, DRIVER_LOCK_FILE)
    guard = None if storage.is_uri(experiment) else storage.join(experiment, DRIVER_LOCK_BREAK_FILE)
    if guard is not None and not _create(guard, Driver.this_process()):
        time.sleep(_PAUSE_S)
        return
    try:
        if _read(lock) == dead:
            storage.move(lock, storage.join(experiment, DRIVER_ENDED_FILE))
    except (FileNotFoundError, ValueError):
        pass
    finally:
        if guard is not None:
            os.unlink(guard)


def _process_start(pid: int) -> Optional[int]:
    """When a process started, in clock ticks since boot (field 22 of /proc/PID/stat, counted after
    the command name, which may hold spaces and parentheses); None without /proc or that process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> Optional[str]:
    """This process's pid namespace (`pid:[4026531836]`); None without /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
