"""What the file-based readers share: one image per file, id/label CSVs, safe file names.

Ids come from CSVs or file names and become paths, so they are checked to be plain names;
a file that is a symbolic link out of the data folder is refused (see `check_confined`).
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np

from model.core.errors import DataError
from model.data.base import PATCH, PCAM_CLASSES, PatchSource
from model.data.images import IMAGE_SUFFIXES, decode_image, resize_rgb

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class FileSource(PatchSource):
    """Patches stored one image per file."""

    paths: list[Path]
    expect_size: tuple[int, int] | None = (PATCH, PATCH)
    # resolved folders that a file which is a symbolic link may point into (None: no check)
    confine: tuple[Path, ...] | None = None

    def read(self, i):
        if self.confine is not None:
            check_confined(self.paths[i], self.confine)
        arr, note = decode_image(self.paths[i], expect_size=self.expect_size)
        if note and len(self.notes) < 20:
            msg = f"{self.paths[i].name}: {note}"
            if msg not in self.notes:
                self.notes.append(msg)
        return arr if self.expect_size else resize_rgb(arr, self.size)

    def path_of(self, i):
        return self.paths[i]


def check_confined(path: Path, roots: tuple[Path, ...]) -> None:
    """Refuse a patch file that is a symbolic link resolving outside the data folder: a data
    set must not make pcam-lens read (and train on, or show) files from elsewhere on the
    machine. Links inside the folder, and a linked folder as a whole (e.g. train/ -> another
    disk), are fine. Costs one lstat per read."""
    if not os.path.islink(path):
        return
    real = Path(os.path.realpath(path))
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise DataError(f"{path} is a symbolic link to {real}, outside the data folder "
                        f"{roots[0]}; links out of the data folder are not followed.",
                        path=path, fix="Copy the file into the data folder (or link the whole "
                                       "folder), or remove the link; --drop-bad skips it.")


def printable_name(name: str) -> str:
    """A file name as text that can always be printed and written as UTF-8 (undecodable
    bytes shown as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 come back as lone surrogates
        return False
    return True


def note_skipped(source: PatchSource, folder: Path, skipped: list[str]) -> None:
    if skipped:
        source.notes.append(
            f"{len(skipped)} file(s) in {folder} ignored because their names are not valid "
            f"UTF-8 (ids must be text): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else "") + "; rename them to use them.")


def check_id(pid: str, csv_path: Path, row: int) -> str:
    pid = pid.strip()
    if not pid:
        raise DataError(f"{csv_path} row {row}: empty id.", path=csv_path,
                        fix="Every row needs an id (the file name without .tif).")
    if "/" in pid or "\\" in pid or ".." in pid or os.path.isabs(pid) or not _ID_RE.match(pid):
        raise DataError(f"{csv_path} row {row}: id {pid!r} is not a plain file name (path "
                        "separators, '..' and unusual characters are refused so that no id can "
                        "point outside the data folder).", path=csv_path,
                        fix="Use the bare patch id, e.g. f38a6374c348f90b587e046aac6079959adf3835.")
    return pid


def _parse_label(value: str, classes: list[str], csv_path: Path, row: int) -> int:
    v = value.strip()
    try:
        f = float(v)
        if f.is_integer() and 0 <= int(f) < len(classes):
            return int(f)
    except ValueError:
        pass
    raise DataError(f"{csv_path} row {row}: label {value!r} is not one of "
                    f"{list(range(len(classes)))}.", path=csv_path,
                    fix="Labels must be 0 (no tumour in the centre 32x32) or 1 (tumour).")


def read_labels_csv(csv_path: Path, classes: list[str] = PCAM_CLASSES
                    ) -> tuple[list[str], np.ndarray]:
    """Read an id,label CSV (extra columns allowed, BOM tolerated). Duplicate ids are an error
    when their labels disagree, and collapsed with a note when they agree."""
    try:
        raw = csv_path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Labels file {csv_path} does not exist.", path=csv_path,
                        fix="Put train_labels.csv (columns id,label) beside train/.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} is not UTF-8 text.", path=csv_path,
                        fix="Save the CSV as UTF-8.") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "id" not in fields or "label" not in fields:
        raise DataError(f"{csv_path} has columns {reader.fieldnames}; it needs 'id' and 'label'.",
                        path=csv_path, fix="Add a header line 'id,label'.")
    reader.fieldnames = fields
    ids, labels, seen = [], [], {}
    for row_no, row in enumerate(reader, start=2):
        pid = check_id(row.get("id") or "", csv_path, row_no)
        lab = _parse_label(row.get("label") or "", classes, csv_path, row_no)
        if pid in seen:
            if seen[pid] != lab:
                raise DataError(f"{csv_path} row {row_no}: id {pid} appears twice with labels "
                                f"{seen[pid]} and {lab}.", path=csv_path,
                                fix="Keep one row per id.")
            continue
        seen[pid] = lab
        ids.append(pid)
        labels.append(lab)
    if not ids:
        raise DataError(f"{csv_path} has no rows.", path=csv_path, fix="Add id,label rows.")
    return ids, np.asarray(labels, dtype=np.int64)


def list_images(folder: Path, skipped: list[str] | None = None) -> list[Path]:
    """Image files of `folder`, sorted. Files whose names are not valid UTF-8 are left out
    (their printable names appended to `skipped` when given): an id must be text that a CSV
    can hold."""
    out = []
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if utf8_name(p.name):
                out.append(p)
            elif skipped is not None:
                skipped.append(printable_name(p.name))
    return sorted(out)


