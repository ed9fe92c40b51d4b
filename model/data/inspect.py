"""Check a data source before training: class balance, colour statistics, and the patches
that would break or distort a run.

`inspect_source(source)` streams over the patches once (decoding in a thread pool, never holding
more than a few hundred patches in memory) and returns an `InspectReport`:

problems (dropped by `filter_source(..., drop_problems=True)`, the trainer's --drop-bad):
    unreadable      the file or row cannot be decoded (truncated, empty, not an image)
    wrong size      a patch that is not the size the source needs (e.g. 95x96 in a Kaggle folder)
    missing file    a labels-CSV id whose file does not exist
    duplicate id    the second and later occurrences of an id
outliers (dropped by `filter_source(..., drop_outliers=True)`, the trainer's --drop-outliers):
    near-black      every pixel value of the patch is below 10 (of 255)
    near-white      every pixel value of the patch is above 245 (of 255)
notes (reported only):
    files without labels, converted images (grayscale, 16-bit, RGBA), identical images
    (byte-identical pixels under different ids)
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from model.core.errors import DataError
from model.data.base import PatchSource, SubsetSource
from model.data.files import FileSource, check_confined
from model.data.images import decode_image, resize_rgb
from model.data.kaggle import KaggleSource

BLACK_MAX = 10  # near-black: patch max (uint8, all pixels and channels) below this
WHITE_MIN = 245  # near-white: patch min above this
EXAMPLES = 3  # ids shown per row of the printed table
_FILE_CHUNK = 32  # files decoded per thread-pool task
_BATCH_CHUNK = 256  # patches per read_batch call for non-file sources
_WINDOW = 4096  # patches in flight at most (bounds memory whatever the source size)


def ids_fingerprint(ids: Sequence[str]) -> str:
    """sha1 of the ids in order: ties a report to the exact source it was made for."""
    h = hashlib.sha1()
    for pid in ids:
        h.update(pid.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class InspectReport:
    """What `inspect_source` found. Findings are JSON-ready dicts that carry the patch's
    `index` in the source and its `id` (plus details such as a message or a size)."""

    source: dict
    n_total: int  # patches in the source
    n_inspected: int  # patches decoded (all whose file exists, unless sampled)
    sampled: bool  # True when --max-items decoded a random sample only
    ids_sha1: str
    classes: list[str]
    class_counts: dict[str, int] | None  # over the whole source; None when unlabelled
    channel_mean: list[float] | None  # RGB, 0-1 scale, over every readable pixel
    channel_std: list[float] | None
    n_pixels: int = 0  # pixels per channel that went into the mean/std
    unreadable: list[dict] = field(default_factory=list)  # index, id, message
    wrong_size: list[dict] = field(default_factory=list)  # index, id, size ("WxH"), expected
    missing_files: list[dict] = field(default_factory=list)  # index, id, path
    duplicate_ids: list[dict] = field(default_factory=list)  # index, id, first_index
    near_black: list[dict] = field(default_factory=list)  # index, id, max
    near_white: list[dict] = field(default_factory=list)  # index, id, min
    unlabelled_files: list[str] = field(default_factory=list)  # file names
    converted: list[dict] = field(default_factory=list)  # index, id, note
    identical_images: list[list[str]] = field(default_factory=list)  # groups of ids
    thresholds: dict = field(default_factory=lambda: {"black_max": BLACK_MAX,
                                                      "white_min": WHITE_MIN})
    seconds: float = 0.0

    # ---------------------------------------------------------------- summaries

    def problem_indices(self) -> set[int]:
        """Indices to drop: unreadable, wrong size, missing file, duplicate ids beyond the
        first occurrence."""
        return {f["index"] for key in ("unreadable", "wrong_size", "missing_files",
                                       "duplicate_ids") for f in getattr(self, key)}

    def outlier_indices(self) -> set[int]:
        return {f["index"] for f in self.near_black + self.near_white}

    def problem_ids(self) -> set[str]:
        """Ids of `problem_indices()`. A duplicated id is listed because its later copies are
        dropped; dropping by id would also drop the first copy, so use `filter_source` (which
        works by index and keeps the first) to apply a report."""
        return {f["id"] for key in ("unreadable", "wrong_size", "missing_files",
                                    "duplicate_ids") for f in getattr(self, key)}

    def outlier_ids(self) -> set[str]:
        """Ids of near-black and near-white patches."""
        return {f["id"] for f in self.near_black + self.near_white}

    @property
    def has_problems(self) -> bool:
        return bool(self.problem_indices())

    def checks(self) -> list[tuple[str, int, list[str]]]:
        """(check, count, ids) rows, in the order the table prints them."""
        rows = [("patches inspected", self.n_inspected, [])]
        if self.class_counts is not None:
            rows += [(f"class {k}: {name}", c, [])
                     for k, (name, c) in enumerate(self.class_counts.items())]
        ids = lambda key: [f["id"] for f in getattr(self, key)]  # noqa: E731
        rows += [
            ("unreadable", len(self.unreadable), ids("unreadable")),
            ("wrong size", len(self.wrong_size), ids("wrong_size")),
            ("labels without files", len(self.missing_files), ids("missing_files")),
            ("duplicate ids", len(self.duplicate_ids), ids("duplicate_ids")),
            ("near-black", len(self.near_black), ids("near_black")),
            ("near-white", len(self.near_white), ids("near_white")),
            ("files without labels", len(self.unlabelled_files), list(self.unlabelled_files)),
            ("converted images", len(self.converted), ids("converted")),
            ("identical images", sum(len(g) for g in self.identical_images),
             [" = ".join(g) for g in self.identical_images]),
        ]
        return rows

    def table(self):
        """A pandas DataFrame with columns check, count, examples (up to 3 ids)."""

        return pd.DataFrame(
            [{"check": c, "count": n, "examples": ", ".join(ex[:EXAMPLES])
              + (", ..." if len(ex) > EXAMPLES else "")} for c, n, ex in self.checks()],
            columns=["check", "count", "examples"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problem_count"] = len(self.problem_indices())
        d["outlier_count"] = len(self.outlier_indices())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InspectReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- scanning


@dataclass
class _Chunk:
    """What one thread-pool task found; only small numbers and short strings, no pixels."""

    done: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    sumsq: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    n_pixels: int = 0
    unreadable: list = field(default_factory=list)
    wrong_size: list = field(default_factory=list)
    near_black: list = field(default_factory=list)
    near_white: list = field(default_factory=list)
    converted: list = field(default_factory=list)
    digests: list = field(default_factory=list)  # (index, digest)

    def add(self, i: int, arr: np.ndarray) -> None:
        """Account for one good HxWx3 uint8 patch."""

        arr = np.ascontiguousarray(arr)
        npx = arr.shape[0] * arr.shape[1]
        # cv2 is ~10x faster than numpy's axis-0 reductions over [H*W, 3]. Running float64
        # sums of per-patch sum and sum of squares: relative error ~1e-15 even over 220k
        # patches (the totals stay far below 2**53).
        mean, std = cv2.meanStdDev(arr)
        mean, std = mean.reshape(3), std.reshape(3)
        self.sums += mean * npx
        self.sumsq += (std * std + mean * mean) * npx
        self.n_pixels += npx
        lo, hi = int(arr.min()), int(arr.max())
        if hi < BLACK_MAX:
            self.near_black.append((i, hi))
        if lo > WHITE_MIN:
            self.near_white.append((i, lo))
        self.digests.append((i, hashlib.blake2b(arr.tobytes(), digest_size=16).digest()))


def _base_source(source: PatchSource) -> PatchSource:
    while isinstance(source, SubsetSource):
        source = source.parent
    return source


def _scan_files(paths: list[Path], expect: tuple[int, int] | None, size: int,
                indices: Sequence[int], confine: tuple[Path, ...] | None = None) -> _Chunk:
    out = _Chunk()
    for i in indices:
        out.done += 1
        try:
            if confine is not None:  # a link out of the data folder is not read
                check_confined(paths[i], confine)
            arr, note = decode_image(paths[i])
        except DataError as e:
            out.unreadable.append((i, str(e)))
            continue
        if expect is not None and arr.shape[:2] != tuple(expect):
            out.wrong_size.append((i, f"{arr.shape[1]}x{arr.shape[0]}",
                                   f"{expect[1]}x{expect[0]}"))
            continue
        if note:
            out.converted.append((i, note))
        out.add(i, arr if expect is not None else resize_rgb(arr, size))
    return out


def _scan_batch(source: PatchSource, indices: Sequence[int]) -> _Chunk:
    out = _Chunk()
    try:
        arrs = source.read_batch(list(indices))
        pairs = list(zip(indices, arrs))
    except (DataError, OSError):
        pairs = []  # find the bad row(s) one by one
        for i in indices:
            try:
                pairs.append((i, source.read(int(i))))
            except (DataError, OSError) as e:
                out.unreadable.append((i, f"{type(e).__name__}: {e}"
                                       if not isinstance(e, DataError) else str(e)))
                out.done += 1
    for i, arr in pairs:
        out.done += 1
        arr = np.asarray(arr)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            out.unreadable.append((i, f"patch has dtype {arr.dtype} shape {arr.shape}, "
                                      "not HxWx3 uint8"))
            continue
        if arr.shape[:2] != (source.size, source.size):
            out.wrong_size.append((i, f"{arr.shape[1]}x{arr.shape[0]}",
                                   f"{source.size}x{source.size}"))
            continue
        out.add(i, arr)
    return out


def _missing_files(paths: list[Path]) -> list[int]:
    """Indices whose file does not exist: one directory listing per folder, not one stat per
    file (220k stats on a network drive are slow)."""
    listing: dict[Path, set[str]] = {}
    missing = []
    for i, p in enumerate(paths):
        parent = p.parent
        if parent not in listing:
            try:
                listing[parent] = {e.name for e in os.scandir(parent) if e.is_file()}
            except OSError:
                listing[parent] = set()
        if p.name not in listing[parent]:
            missing.append(i)
    return missing


def _progress(total: int, enabled: bool):

    # disable=None: no bar when stderr is not a terminal (a log file would fill with redraws)
    return tqdm(total=total, unit="patch", desc="inspect", disable=None if enabled else True,
                mininterval=0.5, file=sys.stderr)


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2)))


def _duplicate_ids(ids: list[str]) -> list[dict]:
    """The second and later occurrences of each id."""
    first: dict[str, int] = {}
    out = []
    for i, pid in enumerate(ids):
        if pid in first:
            out.append({"index": i, "id": pid, "first_index": first[pid]})
        else:
            first[pid] = i
    return out


def _class_counts(source: PatchSource) -> dict[str, int] | None:
    if source.labels is None:
        return None
    counts = np.bincount(np.asarray(source.labels, dtype=np.int64), minlength=len(source.classes))
    return {name: int(c) for name, c in zip(source.classes, counts)}


def _to_decode(n: int, missing: list[int], max_items: int | None, seed: int
               ) -> tuple[np.ndarray, bool]:
    """Indices whose pixels are decoded (all that exist, or a seeded sample); sampled?"""
    todo = np.arange(n, dtype=np.int64)
    if missing:
        todo = np.setdiff1d(todo, np.asarray(missing, dtype=np.int64))
    sampled = max_items is not None and max_items < len(todo)
    if sampled:
        rng = np.random.default_rng(seed)
        todo = np.sort(rng.choice(todo, size=max(0, max_items), replace=False))
    return todo, sampled


def _scan(source: PatchSource, base: PatchSource, paths: list[Path] | None, todo: np.ndarray,
          workers: int, progress: bool) -> _Chunk:
    """Decode `todo` in a thread pool, a window of _WINDOW patches at a time (bounded memory
    whatever the source size), and add up what each task found."""
    if paths is not None:
        expect = getattr(base, "expect_size", None)
        confine = getattr(base, "confine", None)
        chunk, task = _FILE_CHUNK, (lambda idx: _scan_files(paths, expect, source.size, idx,
                                                            confine))
    else:
        chunk, task = _BATCH_CHUNK, (lambda idx: _scan_batch(source, idx))
    total = _Chunk()
    bar = _progress(len(todo), progress)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for w0 in range(0, len(todo), _WINDOW):
                window = todo[w0:w0 + _WINDOW]
                parts = [window[k:k + chunk] for k in range(0, len(window), chunk)]
                for part in pool.map(task, parts):
                    total.done += part.done
                    total.sums += part.sums
                    total.sumsq += part.sumsq
                    total.n_pixels += part.n_pixels
                    for key in ("unreadable", "wrong_size", "near_black", "near_white",
                                "converted", "digests"):
                        getattr(total, key).extend(getattr(part, key))
                    bar.update(part.done)
    finally:
        bar.close()
    return total


def _channel_stats(total: _Chunk) -> tuple[list[float] | None, list[float] | None]:
    """Mean and std per RGB channel on 0-1, from the running sums."""
    if not total.n_pixels:
        return None, None
    npx = float(total.n_pixels)
    m = total.sums / npx
    var = np.maximum(total.sumsq / npx - m * m, 0.0)
    return [float(v) for v in m / 255.0], [float(v) for v in np.sqrt(var) / 255.0]


def _identical(total: _Chunk, ids: list[str]) -> list[list[str]]:
    """Groups of ids whose pixels are byte-identical."""
    groups: dict[bytes, list[int]] = {}
    for i, dg in total.digests:
        groups.setdefault(dg, []).append(i)
    return sorted([ids[i] for i in sorted(g)] for g in groups.values() if len(g) > 1)


def inspect_source(source: PatchSource, progress: bool = True, *, max_items: int | None = None,
                   workers: int | None = None, seed: int = 0) -> InspectReport:
    """Inspect `source` (any PatchSource). With `max_items`, decode a random sample of that
    many patches (seeded, so repeatable); id, label and file-existence checks still cover the
    whole source."""
    t0 = time.perf_counter()
    n, ids = len(source), list(source.ids)
    base = _base_source(source)
    unlabelled = (base.unlabelled_files() if isinstance(base, KaggleSource)
                  and base.split == "train" else [])
    paths, missing = None, []
    if isinstance(base, FileSource):
        paths = [source.path_of(i) for i in range(n)]
        missing = _missing_files(paths)
    todo, sampled = _to_decode(n, missing, max_items, seed)
    total = _scan(source, base, paths, todo, workers or default_workers(), progress)
    mean, std = _channel_stats(total)

    f = lambda i: {"index": int(i), "id": ids[i]}  # noqa: E731
    return InspectReport(
        source=source.describe(), n_total=n, n_inspected=int(total.done),
        sampled=sampled, ids_sha1=ids_fingerprint(ids), classes=list(source.classes),
        class_counts=_class_counts(source),
        channel_mean=mean, channel_std=std, n_pixels=int(total.n_pixels),
        unreadable=[{**f(i), "message": m} for i, m in sorted(total.unreadable)],
        wrong_size=[{**f(i), "size": s, "expected": e} for i, s, e in sorted(total.wrong_size)],
        missing_files=[{**f(i), "path": str(paths[i])} for i in missing],
        duplicate_ids=_duplicate_ids(ids),
        near_black=[{**f(i), "max": v} for i, v in sorted(total.near_black)],
        near_white=[{**f(i), "min": v} for i, v in sorted(total.near_white)],
        unlabelled_files=unlabelled,
        converted=[{**f(i), "note": m} for i, m in sorted(total.converted)],
        identical_images=_identical(total, ids),
        seconds=round(time.perf_counter() - t0, 3),
    )


# --------------------------------------------------------------------------- applying


def filter_source(source: PatchSource, report: InspectReport | dict, drop_problems: bool = True,
                  drop_outliers: bool = False) -> tuple[SubsetSource, dict[str, list[str]]]:
    """Drop what `report` found from `source` (the source the report was made for).

    Returns (subset, dropped) where dropped maps a reason ("unreadable", "wrong_size",
    "missing_file", "duplicate_id", "near_black", "near_white") to the ids dropped for it;
    reasons with nothing dropped are left out. Works by index, so the first copy of a
    duplicated id is kept."""
    if isinstance(report, dict):
        report = InspectReport.from_dict(report)
    if report.n_total != len(source) or report.ids_sha1 != ids_fingerprint(source.ids):
        raise DataError(f"The inspection report is for a different data set "
                        f"({report.n_total} patches) than {source.describe_short()}.",
                        fix="Run python -m model.inspect on this data again.")
    reasons = []
    if drop_problems:
        reasons += [("unreadable", "unreadable"), ("wrong_size", "wrong_size"),
                    ("missing_files", "missing_file"), ("duplicate_ids", "duplicate_id")]
    if drop_outliers:
        reasons += [("near_black", "near_black"), ("near_white", "near_white")]
    drop: set[int] = set()
    dropped: dict[str, list[str]] = {}
    for key, reason in reasons:
        for finding in getattr(report, key):
            i = int(finding["index"])
            if i not in drop:
                drop.add(i)
                dropped.setdefault(reason, []).append(finding["id"])
    keep = np.asarray([i for i in range(len(source)) if i not in drop], dtype=np.int64)
    if len(keep) == 0:
        raise DataError(f"Every one of the {len(source)} patches of {source.describe_short()} "
                        "would be dropped.", fix="Check the data with python -m model.inspect.")
    return source.subset(keep), dropped


# --------------------------------------------------------------------------- CLI


def format_table(report: InspectReport) -> str:
    """The table as aligned plain text (check left, count right, examples left)."""
    df = report.table()
    rows = [("check", "count", "examples")] + [
        (str(r.check), str(r.count), str(r.examples)) for r in df.itertuples(index=False)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- duplicates


def dihedral_digest(rgb: np.ndarray) -> bytes:
    """A digest equal for a patch and each of its 8 flips/rotations (the smallest of the
    views' digests): exact duplicates that were flipped or rotated share it."""
    views = (np.rot90(v, k) for v in (rgb, rgb[:, ::-1]) for k in range(4))
    return min(hashlib.blake2b(np.ascontiguousarray(v).tobytes(), digest_size=16).digest()
               for v in views)


def tissue_fraction(rgb: np.ndarray, min_saturation: int = 20) -> float:
    """Share of pixels with colour (max - min channel above `min_saturation`): stained
    tissue; glass, background and black borders are grey."""
    sat = rgb.max(-1).astype(np.int16) - rgb.min(-1)
    return float((sat > min_saturation).mean())


def dihedral_digests(source: PatchSource, batch: int = 512
                     ) -> tuple[list[bytes], np.ndarray]:
    """(`dihedral_digest`, `tissue_fraction`) of every patch, read in batches (memory
    bounded by `batch`)."""
    out: list[bytes] = []
    tissue = np.empty(len(source), np.float32)
    for s in range(0, len(source), batch):
        xs = source.read_batch(range(s, min(s + batch, len(source))))
        out += [dihedral_digest(x) for x in xs]
        tissue[s:s + len(xs)] = [tissue_fraction(x) for x in xs]
    return out, tissue


def digest_groups(digests: Sequence[bytes]) -> list[list[int]]:
    """Rows sharing a digest, groups of two or more, in row order."""
    groups: dict[bytes, list[int]] = {}
    for i, d in enumerate(digests):
        groups.setdefault(d, []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)
