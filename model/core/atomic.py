"""Atomic file writes: a reader sees either the old file or the complete new one, never a
half-written file, even if the process is killed (SIGKILL, power loss) mid-write."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from model.core.errors import StorageError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


TMP_SUFFIX = ".tmp"
# mkstemp names: "." + target name + "." + 8 random characters + ".tmp"
_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

# errno -> (what went wrong, how to fix it): the failures of a write that the user can fix
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("disk full (no space left on the device)",
                   "Free some space on that disk, or write somewhere else."),
    errno.EDQUOT: ("disk quota exceeded (disk full for this user)",
                   "Free some space within your quota, or write somewhere else."),
    errno.EROFS: ("read-only file system",
                  "Write to a folder on a writable disk (e.g. another --run-dir or --out)."),
    errno.EACCES: ("permission denied (the folder is read-only for this user)",
                   "Make the folder writable for this user, or write somewhere else."),
    errno.EPERM: ("operation not permitted (the folder is read-only for this user)",
                  "Make the folder writable for this user, or write somewhere else."),
    errno.EISDIR: ("it is a folder, not a file", "Give a file name, not a folder."),
    errno.ENOTDIR: ("a part of the path is a file, not a folder",
                    "Give a path whose folders are folders."),
    errno.EEXIST: ("a part of the path is a file, not a folder",
                   "Give a path whose folders are folders."),
}


def storage_error(e: BaseException, path) -> StorageError | None:
    """A StorageError naming `path` for an OSError the user can fix (disk full, quota,
    read-only file system, no permission, a folder or file in the way); None otherwise."""
    if isinstance(e, StorageError) or not isinstance(e, OSError):
        return None
    info = _STORAGE_ERRNOS.get(e.errno)
    if info is None:
        return None
    what, fix = info
    return StorageError(f"Cannot write {path}: {what}. Files written before are unchanged.",
                        path=path, fix=fix, errno=e.errno)


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that writers killed mid-write (SIGKILL, power loss) left in
    `folder` (not recursive); return their names. Only for a folder no other process is
    writing to at the same time (e.g. a run directory being resumed)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if _TMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True,
                encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it over `path`.

    On any exception the temporary file is removed and `path` is untouched. A full disk, an
    exceeded quota, a read-only file system or a missing permission raise `StorageError` (a
    PcamLensError and an OSError) naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise storage_error(e, path) or e from None
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    binary = "b" in mode
    with _storage_errors(path, lambda: os.unlink(tmp)):
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding, "newline": ""})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)


@contextlib.contextmanager
def _storage_errors(path: Path, cleanup=None) -> Iterator[None]:
    """On any exception run `cleanup` (errors ignored); an OSError the user can fix becomes
    a StorageError naming `path`, anything else goes on as it is."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        err = storage_error(e, path) if isinstance(e, OSError) else None
        if err is None:
            raise
        raise err from None


def write_text(path, text: str, *, fsync: bool = True) -> None:
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def write_bytes(path, data: bytes, *, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_json(path, obj, *, fsync: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n",
               fsync=fsync)


def write_csv(path, df, *, fsync: bool = True) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_open(path, "w", fsync=fsync) as f:
        df.to_csv(f, index=False)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def marked_read_only(folder: str | os.PathLike) -> bool:
    """True when `folder` (or its nearest existing parent) has no write bit for anyone.

    Root can write there anyway; we still treat such a folder as read-only, so that running as
    root never drops review logs or packs into a data set someone deliberately made read-only."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return not (p.stat().st_mode & 0o222)
    except OSError:
        return True


def can_create_files(folder: str | os.PathLike) -> bool:
    """Really create (and remove) a probe file in `folder`: os.access says yes to root on
    read-only mounts, and is wrong for ACLs and some network file systems."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pcam-lens-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside `path`; on success it replaces `path` (a whole result set
    appears at once, and a killed job leaves no half-written result under `path`, only a
    hidden `.<name>.<random>.tmp` folder that the next run removes)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX,
                                    dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    except OSError as e:
        raise storage_error(e, path) or e from None
    with _storage_errors(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        old = None
        if path.exists():  # an older result: moved aside, then removed
            old = path.parent / f".{path.name}.old{TMP_SUFFIX}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path` for a library that wants a name, not a file
    object (tifffile); renamed over `path` on success, removed on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_UMASK)
    except OSError as e:
        raise storage_error(e, path) or e from None
    tmp = Path(name)
    with _storage_errors(path, lambda: os.unlink(tmp)):
        yield tmp
        with open(tmp, "rb") as g:
            os.fsync(g.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
