"""Experiment storage: a local path or any URI Ray Tune accepts (s3://, gs://, file://, …),
read and written through `pyarrow.fs`, as Ray Tune itself does (`FileSystem.from_uri`), so
there is no code per scheme. Credentials and endpoint come from the provider's usual
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, for a
server other than AWS, AWS_ENDPOINT_URL) or from the URI's query (pyarrow's options, e.g.
`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`).

Code that reads or writes local files works on `local_folder(location)`: the location itself
when it is local, else a temporary folder seeded from the location and uploaded back to it.
`sweep status` and `sweep analyze` seed theirs with a mirror of the files they read
(`record.mirror`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

from diffusion_lib.atomic import atomic_path, atomic_write_text
from diffusion_lib.config import ConfigError

_BUCKETED = ("s3", "gcs")  # pyarrow filesystems whose first path component is a bucket
_SCHEMES = {"gcs": "gs"}  # URI schemes of the pyarrow filesystems not named as their scheme
_COPY_THREADS = 8
_WRITE_CHECK_BYTES = 1 << 20  # less room than this for a sweep's files is a full disk
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded


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


def experiment_location(storage: str, name: str) -> str:
    """Where experiment `name` lives in `storage`: a local path made absolute, or a URI (its
    ?query of pyarrow options kept at the end)."""
    return join(storage, name) if is_uri(storage) else str(Path(storage).expanduser().resolve() / name)


def name_of(location: str) -> str:
    """The last path component (an experiment's name) of a path or URI, query left out."""
    if not is_uri(location):
        return Path(location).name
    split = urllib.parse.urlsplit(location)
    return (split.path.rstrip("/").rsplit("/", 1)[-1]) or split.netloc


def location_of(fs, path: str) -> str:
    """A path on a pyarrow filesystem as a user names it: a local path, or a URI
    (`s3://bucket/key`; pyarrow's options, e.g. an endpoint, left out)."""
    if fs.type_name == "local":
        return path
    return f"{_SCHEMES.get(fs.type_name, fs.type_name)}://{path}"


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


def _check_writable(folder: Path, what: str) -> None:
    """An unwritable folder (or a full disk) is refused now, not after Ray started and trials ran.
    A block is written and flushed to disk: a full disk still makes an empty file. The folders
    made for the check are removed again: a run refused later leaves nothing behind."""
    made = missing_folders(str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
            probe.write(bytes(_WRITE_CHECK_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise ConfigError(f"{what}: cannot write to {folder}: {err.strerror or err}") from None
    finally:
        remove_folders(made)


def missing_folders(location: str) -> list[str]:
    """The folders `location` (a path or URI) needs that do not exist yet, deepest first, so that
    work refused or failed before it stored anything can remove what it made (`remove_folders`).
    On an object store: the location itself when nothing is stored under it (a prefix is no
    folder of its own)."""
    if is_uri(location):
        return [] if exists(location) else [location]
    path = Path(location)
    return [str(p) for p in (path, *path.parents) if not p.exists()]


def remove_folders(folders: list[str]) -> None:
    """Remove the folders `missing_folders` listed: the deepest with whatever was written in it
    since, then each parent made for it (left where something else has been put there meanwhile)."""
    for depth, folder in enumerate(folders):
        with contextlib.suppress(OSError):
            if depth == 0:
                remove_folder(folder)
            else:
                Path(folder).rmdir()


def validate_storage(location: str, what: str = "storage") -> None:
    """Check a storage URI now rather than after Ray started and trials ran: the scheme is known,
    the URI well formed, the endpoint reachable with the credentials at hand and the bucket
    there; a local folder made (as the run would make it) and written to once. Raises
    ConfigError, its message starting with `what` (the spec key, or the command's argument)."""
    if not is_uri(location):
        _check_writable(Path(location), what)
        return
    fs, path = resolve(location, what)
    bucket = path.strip("/").split("/", 1)[0]
    if fs.type_name in _BUCKETED and not bucket:
        raise ConfigError(
            f"{what}: {location} names no bucket; expected e.g. {fs.type_name.replace('gcs', 'gs')}://bucket/prefix"
        )
    probe = bucket if fs.type_name in _BUCKETED else path
    try:
        info = fs.get_file_info(probe)
    except OSError as err:
        raise ConfigError(
            f"{what}: cannot reach {location}: {_one_line(err)}; "
            "check the endpoint (for S3 AWS_ENDPOINT_URL or the URI's endpoint_override), "
            "the credentials and the network"
        ) from None
    import pyarrow.fs

    if fs.type_name in _BUCKETED and info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(
            f"{what}: {location}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
            "create it first"
        )
    if info.type == pyarrow.fs.FileType.File:
        raise ConfigError(f"{what}: {location} is a file, not a folder")


@contextlib.contextmanager
def local_folder(
    location: str, *, seed: Optional[Callable[[str, Path], object]] = None, upload_changes: bool = True
) -> Iterator[Path]:
    """A local folder standing for `location` (a path or URI): the location itself when local;
    else a temporary folder named like it, seeded by `seed(location, folder)` (e.g.
    `download_tree`), whose new and changed files are uploaded to `location` when the block
    ends without an error (unless `upload_changes` is False), and which is removed then."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="sweep-") as scratch:
        folder = Path(scratch) / name_of(location)
        folder.mkdir()
        if seed is not None:
            seed(location, folder)
        seeded = _file_stamps(folder)
        yield folder
        if upload_changes:
            changed = [p for p, stamp in _file_stamps(folder).items() if seeded.get(p) != stamp]
            with ThreadPoolExecutor(_COPY_THREADS) as pool:
                list(pool.map(lambda p: upload(folder / p, join(location, *Path(p).parts)), changed))


def named_as(location: str, folder: Path) -> Callable[[str], str]:
    """Text about `folder`, a `local_folder` of `location`, naming the location instead: the URI,
    not the temporary folder the user never asked for."""
    return (lambda text: text.replace(str(folder), location)) if is_uri(location) else (lambda text: text)


def _file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under `folder` (relative path) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def exists(location: str) -> bool:
    import pyarrow.fs

    fs, path = resolve(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def remove_file(location: str) -> None:
    """Delete the file at `location` (a path or URI); nothing when there is none."""
    import pyarrow.fs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def read_text(location: str | os.PathLike) -> str:
    """A whole file's text; FileNotFoundError when there is none."""
    import pyarrow.fs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def move(source: str, target: str) -> None:
    """Rename a file on one storage (atomic locally; a copy and a delete on an object store)."""
    fs, source_path = resolve(source)
    fs.move(source_path, resolve(target)[1])


def remove_folder(location: str) -> None:
    """Delete a folder and everything under it (on an object store: every object under the prefix)."""
    fs, path = resolve(location)
    fs.delete_dir(path)


def full_disk_path(error: BaseException, location: str) -> Optional[str]:
    """Where a write failed for want of space, when that is why `error` happened: the file a
    no-space (or quota) error names; else `location` (a local path: a no-space error without a
    file, as numpy's writes raise it, is taken for its disk; and whatever the error says when
    that disk is left with less room than a sweep needs to start, `_WRITE_CHECK_BYTES`, since Ray
    hands errors on wrapped and at times as another error altogether: an error file it could not
    write whole fails to unpickle). None otherwise: the error is not about space, or is about an
    unnamed local disk while the experiment is on cloud storage."""
    no_space = False
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL_DISK_ERRNOS:
            if error.filename:
                return str(error.filename)
            no_space = True
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__  # Ray's chain, then Python's
    if is_uri(location):
        return None
    return location if no_space or _free_bytes(location) < _WRITE_CHECK_BYTES else None


def require_room(location: str, size: int) -> None:
    """Refuse to write `size` bytes under a local `location` (a path or URI) whose disk would be
    left with less room than a sweep needs (`_WRITE_CHECK_BYTES`): an OSError "no space left"
    naming `location`, before anything is written. A write that fills the disk leaves none for
    the record of what happened (Ray rewrites its experiment state in place: cut short, it
    loses `--resume`). Nothing for a URI: object stores do not fill up."""
    if not is_uri(location) and _free_bytes(location) < size + _WRITE_CHECK_BYTES:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), location)


def _free_bytes(local: str) -> int:
    """Free bytes on the disk of a local path (of its nearest existing parent, when it is not made yet)."""
    existing = next(p for p in (Path(local), *Path(local).parents) if p.exists())
    return shutil.disk_usage(existing).free


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


def fetch_all(fs, items: list[tuple[Path, object]]) -> None:
    def fetch(item):
        local, info = item
        _fetch(fs, info.path, local)
        set_mtime(local, info)

    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(fetch, items))


def set_mtime(local: Path, info) -> None:
    if info.mtime is not None:
        stamp = info.mtime.timestamp()
        os.utime(local, (stamp, stamp))


def download_tree(location: str, local_dir: str | os.PathLike) -> Path:
    """Every file under `location` into `local_dir` (nothing when there is nothing there)."""
    import pyarrow.fs

    fs, root = resolve(location)
    root = root.rstrip("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    items = [
        (Path(local_dir).joinpath(*[p for p in i.path[len(root) :].split("/") if p]), i)
        for i in infos
        if i.type == pyarrow.fs.FileType.File
    ]
    fetch_all(fs, items)
    return Path(local_dir)


def download_matching(location: str, local_dir: str | os.PathLike, pattern: str) -> Path:
    """The files directly under `location` whose names match `pattern` (fnmatch) into `local_dir`."""
    import fnmatch

    import pyarrow.fs

    fs, root = resolve(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root.rstrip("/"), allow_not_found=True))
    files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
    fetch_all(fs, [(Path(local_dir) / i.base_name, i) for i in files if fnmatch.fnmatch(i.base_name, pattern)])
    return Path(local_dir)


def _make_parent(fs, path: str) -> None:
    """Object stores need no folders (and creating one writes a marker object): only filesystems
    with real directories get the parent made."""
    if fs.type_name not in _BUCKETED:
        parent = path.rstrip("/").rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
