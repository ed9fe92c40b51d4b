"""User-facing errors.

Expected problems with input (a missing folder, a bad CSV, a broken image) raise
`PcamLensError` with a message that names the file and says how to fix it. The CLIs catch it,
print the message without a traceback and exit non-zero; the viewer shows it with `st.error`.
"""
from __future__ import annotations


class PcamLensError(Exception):
    """An expected, explainable failure caused by input the user can fix."""

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [message]
        if self.path and self.path not in message:
            parts.append(f"(file: {self.path})")
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class DataError(PcamLensError):
    """Bad data: folders, CSVs, images, HDF5 files."""


class RunError(PcamLensError):
    """A run directory that is missing, incomplete, corrupted or from an incompatible version."""


class WeightsError(PcamLensError):
    """Pretrained weights that cannot be obtained."""


class StorageError(PcamLensError, OSError):
    """A file could not be written: the disk is full, a quota is exceeded, the file system is
    read-only or the folder is not writable. Also an OSError, so code that tolerates failed
    writes (`except OSError`, e.g. optional caches) keeps doing so."""

    def __init__(self, message: str, *, path: object | None = None, fix: str | None = None,
                 errno: int | None = None):
        super().__init__(message, path=path, fix=fix)
        self.errno = errno
        self.filename = self.path

    def __str__(self) -> str:  # OSError would print "[Errno N] None: path"
        return str(self.args[0]) if self.args else ""


def one_line(e: PcamLensError) -> PcamLensError:
    """A PcamLensError raised in a DataLoader worker comes back as the same type whose message
    is "Caught DataError in DataLoader worker process 0. Original Traceback ...": keep only the
    original message, so that CLIs print one line and no traceback."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    name = type(e).__name__
    for prefix in (f"{type(e).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    err = type(e).__new__(type(e))
    Exception.__init__(err, last)
    err.path, err.fix = None, None
    return err
