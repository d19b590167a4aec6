"""Experiment storage: a local path or any URI Ray Tune accepts (s3://, gs://, file://, …),
read and written through `pyarrow.fs`, as Ray Tune itself does (`FileSystem.from_uri`), so
there is no code per scheme. Credentials and endpoint come from the provider's usual
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, for a
server other than AWS, AWS_ENDPOINT_URL) or from the URI's query (pyarrow's options, e.g.
`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`).

`sweep status` and `sweep analyze` read local files: for a URI they work on a local mirror
of the files they read (`mirror_experiment`), with each file's time set to the object's.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

from diffusion_lib.atomic import atomic_path, atomic_write_text
from diffusion_lib.checkpoint import CHECKPOINT_DIR
from diffusion_lib.config import ConfigError
from diffusion_lib.milestone import STEP
from diffusion_lib.run_log import METRICS_FILE

from .layout import RAY_CHECKPOINT_GLOB, RAY_ERROR_FILE, SUMMARY_FILE, SWEEP_FILE, TRIAL_FILE, one_line_error

RAY_STATE_GLOB = "experiment_state-*.json"  # Ray's driver state, which sweeps/status.py reads (importing it imports analysis)
CHECKPOINT_GLOB = "step_*.pt"
_BUCKETED = ("s3", "gcs")  # pyarrow filesystems whose first path component is a bucket
_COPY_THREADS = 8


def is_uri(location: str | os.PathLike) -> bool:
    """A URI (`scheme://…`) rather than a local path (the test the spec and the runner use too)."""
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    """`location/part/…`: a local path, or a URI with its query (pyarrow's options) kept at the end.

    >>> join("s3://b/runs?scheme=http&endpoint_override=h:9000", "tiny", "sweep.json")
    's3://b/runs/tiny/sweep.json?scheme=http&endpoint_override=h:9000'
    """
    if not is_uri(location):
        return str(Path(location, *parts))
    split = urllib.parse.urlsplit(location)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urllib.parse.urlunsplit(split._replace(path=path))


def name_of(location: str) -> str:
    """The last path component (an experiment's name) of a path or URI, query left out."""
    if not is_uri(location):
        return Path(location).name
    split = urllib.parse.urlsplit(location)
    return (split.path.rstrip("/").rsplit("/", 1)[-1]) or split.netloc


def resolve(location: str | os.PathLike, what: str = "storage"):
    """(pyarrow filesystem, path on it). A URI pyarrow cannot open is a ConfigError about `what`."""
    import pyarrow
    import pyarrow.fs

    location = str(location)
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowException, ValueError, OSError) as err:
        raise ConfigError(
            f"{what}: {location} is not a location pyarrow (and so Ray Tune) can open: {_one_line(err)}; "
            "use a local path or a URI such as s3://bucket/prefix, gs://bucket/prefix"
        ) from None


def validate_storage(location: str, what: str = "storage") -> None:
    """Check a storage URI now rather than after Ray started and trials ran: the scheme is known,
    the URI well formed, the endpoint reachable with the credentials at hand and the bucket
    there. A local path is left to the run (its folders are created). Raises ConfigError, its
    message starting with `what` (the spec key, or the command's argument)."""
    if not is_uri(location):
        return
    fs, path = resolve(location, what)
    bucket = path.strip("/").split("/", 1)[0]
    if fs.type_name in _BUCKETED and not bucket:
        raise ConfigError(f"{what}: {location} names no bucket; expected e.g. {fs.type_name.replace('gcs', 'gs')}://bucket/prefix")
    probe = bucket if fs.type_name in _BUCKETED else path
    try:
        info = fs.get_file_info(probe)
    except OSError as err:
        raise ConfigError(
            f"{what}: cannot reach {location}: {_one_line(err)}; check the endpoint (for S3 "
            "AWS_ENDPOINT_URL or the URI's endpoint_override), the credentials and the network"
        ) from None
    import pyarrow.fs

    if fs.type_name in _BUCKETED and info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"{what}: {location}: bucket {bucket!r} does not exist (or these credentials cannot see it); create it first")
    if info.type == pyarrow.fs.FileType.File:
        raise ConfigError(f"{what}: {location} is a file, not a folder")


def exists(location: str) -> bool:
    import pyarrow.fs

    fs, path = resolve(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a whole file so a reader never sees half of it: a temp file and rename locally, a
    single upload to an object store (an object appears only when its upload completes)."""
    import pyarrow.fs

    fs, path = resolve(location)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        atomic_write_text(path, text)
        return
    _make_parent(fs, path)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def upload(local_file: str | os.PathLike, location: str) -> None:
    """Copy one local file to `location` (a path or URI)."""
    import pyarrow.fs

    fs, path = resolve(location)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        with atomic_path(path) as tmp:
            shutil.copyfile(local_file, tmp)
        return
    _make_parent(fs, path)
    with open(local_file, "rb") as src, fs.open_output_stream(path) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def upload_tree(local_dir: str | os.PathLike, location: str) -> list[str]:
    """Copy every file under `local_dir` to the same relative paths under `location`; return them."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    targets = [join(location, *p.relative_to(local_dir).parts) for p in files]
    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(upload, files, targets))
    return targets


def download(location: str, local_file: str | os.PathLike) -> Path:
    """Copy one file at `location` to `local_file` (written atomically); return its path."""
    fs, path = resolve(location)
    return _fetch(fs, path, Path(local_file))


def _fetch(fs, path: str, local: Path) -> Path:
    with atomic_path(local) as tmp:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return local


# ---- mirrors for `sweep status` and `sweep analyze` -------------------------------------------

# What each file of the experiment is to a mirror, by its path relative to the experiment.
SMALL, CHECKPOINT, SKIP = "small", "checkpoint", "skip"


def experiment_file_kind(parts: tuple[str, ...]) -> str:
    """SMALL: what analysis and status read (sweep.json, the summary, Ray's experiment state, each
    trial's trial.json, metrics.jsonl and error.txt); CHECKPOINT: a trainer checkpoint in a Ray
    `checkpoint_*/` (or `sweep train`'s `checkpoints/`) folder; SKIP: the rest (TensorBoard
    events, sample grids, the FID reference, Ray's own files, earlier analyses)."""
    name = parts[-1]
    per_run = (TRIAL_FILE, METRICS_FILE, RAY_ERROR_FILE)
    if len(parts) == 1:
        return SMALL if name in (SWEEP_FILE, SUMMARY_FILE, *per_run) or fnmatch.fnmatch(name, RAY_STATE_GLOB) else SKIP
    if len(parts) == 2 and name in per_run and parts[0] != "analysis":
        return SMALL
    if fnmatch.fnmatch(name, CHECKPOINT_GLOB) and len(parts) in (2, 3) and (
        fnmatch.fnmatch(parts[-2], RAY_CHECKPOINT_GLOB) or parts[-2] == CHECKPOINT_DIR
    ):
        return CHECKPOINT
    return SKIP


def mirror_experiment(location: str, local_dir: str | os.PathLike, *,
                      checkpoints: Optional[Callable[[Path], Iterable[Path]]] = None) -> Path:
    """Bring the experiment at `location` (a URI) into `local_dir`, or bring an existing mirror up
    to date: the SMALL files, each with its object's time as its mtime (what `sweep status`
    judges freshness by), files gone from the storage removed. Checkpoints are left out unless
    `checkpoints` is given: then each appears as an empty placeholder (so a reader sees which
    steps were kept) and the ones `checkpoints(local_dir)` names (called once the SMALL files
    and placeholders are in place) are downloaded for real. Raises ConfigError when nothing is
    stored there."""
    import pyarrow.fs

    local_dir = Path(local_dir)
    fs, root = resolve(location)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise ConfigError(f"{location}: cannot list the experiment: {_one_line(err)}") from None
    files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
    if not files:
        raise ConfigError(f"{location}: no such experiment (nothing is stored there)")

    wanted: dict[Path, tuple[str, object]] = {}
    for info in files:
        parts = tuple(p for p in info.path[len(root):].split("/") if p)
        kind = experiment_file_kind(parts)
        if kind == SMALL or (kind == CHECKPOINT and checkpoints is not None):
            wanted[local_dir.joinpath(*parts)] = (kind, info)

    def stale(local: Path, info) -> bool:
        try:
            stat = local.stat()
        except FileNotFoundError:
            return True
        return stat.st_size != info.size or (info.mtime is not None and abs(stat.st_mtime - info.mtime.timestamp()) > 1e-3)

    small = [(local, info) for local, (kind, info) in wanted.items() if kind == SMALL and stale(local, info)]
    _fetch_all(fs, small)
    for local, (kind, info) in wanted.items():  # placeholders: empty, the object's time
        if kind == CHECKPOINT and not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
            _set_mtime(local, info)
    if checkpoints is not None:
        chosen = {Path(p) for p in checkpoints(local_dir)}
        _fetch_all(fs, [(local, info) for local, (kind, info) in wanted.items() if kind == CHECKPOINT and local in chosen and stale(local, info)])
    for local in [p for p in local_dir.rglob("*") if p.is_file()]:  # gone from the storage
        if local not in wanted and experiment_file_kind(local.relative_to(local_dir).parts) != SKIP:
            local.unlink(missing_ok=True)
    return local_dir


def _fetch_all(fs, items: list[tuple[Path, object]]) -> None:
    def fetch(item):
        local, info = item
        _fetch(fs, info.path, local)
        _set_mtime(local, info)

    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(fetch, items))


def _set_mtime(local: Path, info) -> None:
    if info.mtime is not None:
        stamp = info.mtime.timestamp()
        os.utime(local, (stamp, stamp))


def best_checkpoints(mirror: Path) -> list[Path]:
    """Each trial's checkpoint of its best checkpointed milestone by the sweep's metric: the one
    `sweep analyze` draws a trial's sample grid from (its top trials'), without fetching the
    other kept checkpoint (Ray keeps the newest too)."""
    from analysis.experiment import load_experiment

    experiment = load_experiment(mirror)
    chosen = []
    for trial in experiment.trials:
        best = trial.best_milestone(experiment.metric, experiment.mode, checkpointed=True)
        if best is not None:
            chosen.append(trial.checkpoints[best[STEP.name]])
    return chosen


def analyze_location(location: str, out: Optional[Path] = None) -> tuple[str, list[str]]:
    """`analysis.report.analyze_experiment` on an experiment at a local path or a URI; return where
    report.md is and the warnings (paths in them named as `location`, not the mirror). For a URI
    the experiment is mirrored into a temporary folder (small files, each trial's best checkpoint)
    and, without `out`, the analysis is uploaded to `location/analysis/`."""
    import tempfile

    from analysis.report import analyze_experiment

    if not is_uri(location):
        warnings = analyze_experiment(Path(location), out)
        return str((out or Path(location) / "analysis") / "report.md"), warnings
    validate_storage(location, "EXPERIMENT")
    with tempfile.TemporaryDirectory(prefix="sweep-analyze-") as scratch:
        mirror = Path(scratch) / name_of(location)  # the report is titled by the folder's name
        mirror_experiment(location, mirror, checkpoints=best_checkpoints)
        warnings = [w.replace(str(mirror), location) for w in analyze_experiment(mirror, out)]
        if out is not None:
            return str(out / "report.md"), warnings
        target = join(location, "analysis")
        upload_tree(mirror / "analysis", target)
        return join(target, "report.md"), warnings


def download_tree(location: str, local_dir: str | os.PathLike) -> Path:
    """Every file under `location` into `local_dir` (nothing when there is nothing there)."""
    import pyarrow.fs

    fs, root = resolve(location)
    root = root.rstrip("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    items = [(Path(local_dir).joinpath(*[p for p in i.path[len(root):].split("/") if p]), i)
             for i in infos if i.type == pyarrow.fs.FileType.File]
    _fetch_all(fs, items)
    return Path(local_dir)


def _make_parent(fs, path: str) -> None:
    """Object stores need no folders (and creating one writes a marker object): only filesystems
    with real directories get the parent made."""
    if fs.type_name not in _BUCKETED:
        parent = path.rstrip("/").rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)


def _one_line(err: BaseException) -> str:
    return one_line_error(f"{type(err).__name__}: {err}".replace("\n", " "))
