"""Patch sources behind one interface.

Every source exposes `ids`, `labels` (int64 class indices, or None for unlabelled data),
`classes`, optional `groups` (slide ids, for grouped splits) and random access to uint8 RGB
arrays through `read(i)` / `read_batch(indices)`. `open_source(spec, split)` picks the right
class from what lies at `spec`:

- a Kaggle folder: train/<id>.tif + train_labels.csv, test/<id>.tif, sample_submission.csv
- official PCam HDF5: camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (a folder or one
  _x.h5 file), read lazily
- a flat folder of images (unlabelled, e.g. a test folder)
- folder per class: root/<class>/*.png|jpg|tif, any size, resized to `size`
- "synthetic" (optionally "synthetic:n=2000,seed=0"): the built-in procedural set
- a packed cache (see model.pack) is used transparently when one exists for the source
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import DataError
from model.images import IMAGE_SUFFIXES, decode_image, resize_rgb

PATCH = 96  # PCam patch side in pixels
CENTRE = 32  # the labelled centre region side in pixels
PCAM_CLASSES = ["no tumour", "tumour"]
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Folder names that mean "the positive class" in binary class-folder sets, so that
# probability = P(positive) whatever the alphabetical order is.
_POSITIVE_NAMES = {"1", "positive", "pos", "tumor", "tumour", "cancer", "malignant",
                   "metastasis", "parasitized", "parasitised", "infected"}


@dataclass
class PatchSource:
    """Base class: a list of patches with optional labels."""

    kind: str
    root: Path | None
    ids: list[str]
    labels: np.ndarray | None
    classes: list[str]
    split: str | None = None
    groups: np.ndarray | None = None
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    size: int = PATCH

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Patches for `indices` as one [n, size, size, 3] uint8 array."""
        out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        for k, i in enumerate(indices):
            out[k] = self.read(int(i))
        return out

    def path_of(self, i: int) -> Path | None:
        return None

    def index_of(self, patch_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {pid: k for k, pid in enumerate(self.ids)}
        try:
            return self._index[patch_id]
        except KeyError:
            raise DataError(f"Patch id {patch_id!r} is not in {self.describe_short()}.") from None

    def describe(self) -> dict:
        """What config.json records to reopen this source."""
        return {"kind": self.kind, "path": None if self.root is None else str(self.root),
                "split": self.split, "n": len(self), "classes": list(self.classes),
                "synthetic": self.synthetic, "labelled": self.labelled}

    def describe_short(self) -> str:
        where = "built-in SYNTHETIC set" if self.synthetic else str(self.root)
        return f"{self.kind} source {where} ({self.split or 'all'}, {len(self)} patches)"

    def subset(self, indices: Sequence[int]) -> SubsetSource:
        return SubsetSource(self, np.asarray(indices, dtype=np.int64))


class SubsetSource(PatchSource):
    """A view on some indices of another source (used for train/valid splits, dropping)."""

    def __init__(self, parent: PatchSource, indices: np.ndarray):
        super().__init__(kind=parent.kind, root=parent.root,
                         ids=[parent.ids[i] for i in indices],
                         labels=None if parent.labels is None else parent.labels[indices],
                         classes=parent.classes, split=parent.split,
                         groups=None if parent.groups is None else parent.groups[indices],
                         synthetic=parent.synthetic, notes=parent.notes, size=parent.size)
        self.parent, self.indices = parent, indices

    def read(self, i):
        return self.parent.read(int(self.indices[i]))

    def read_batch(self, indices):
        return self.parent.read_batch(self.indices[np.asarray(indices, dtype=np.int64)])

    def path_of(self, i):
        return self.parent.path_of(int(self.indices[i]))

    def describe(self):
        return self.parent.describe()


# --------------------------------------------------------------------------- file-based


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


def _utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 come back as lone surrogates
        return False
    return True


def _note_skipped(source: PatchSource, folder: Path, skipped: list[str]) -> None:
    if skipped:
        source.notes.append(
            f"{len(skipped)} file(s) in {folder} ignored because their names are not valid "
            f"UTF-8 (ids must be text): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else "") + "; rename them to use them.")


def _check_id(pid: str, csv_path: Path, row: int) -> str:
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
        pid = _check_id(row.get("id") or "", csv_path, row_no)
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


def _list_images(folder: Path, skipped: list[str] | None = None) -> list[Path]:
    """Image files of `folder`, sorted. Files whose names are not valid UTF-8 are left out
    (their printable names appended to `skipped` when given): an id must be text that a CSV
    can hold."""
    out = []
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if _utf8_name(p.name):
                out.append(p)
            elif skipped is not None:
                skipped.append(printable_name(p.name))
    return sorted(out)


class KaggleSource(FileSource):
    """Kaggle "Histopathologic Cancer Detection" layout."""

    def __init__(self, root: Path, split: str = "train"):
        root = Path(root)
        labels_csv = root / "train_labels.csv"
        if split == "train":
            folder = root / "train"
            ids, labels = read_labels_csv(labels_csv)
            paths = [folder / f"{pid}.tif" for pid in ids]
        elif split == "test":
            folder = root / "test"
            if not folder.is_dir():
                raise DataError(f"{root} has no test/ folder.", path=root,
                                fix="Point --data at the Kaggle folder that holds test/.")
            sub = root / "sample_submission.csv"
            skipped: list[str] = []
            files = {p.stem: p for p in _list_images(folder, skipped)}
            if sub.exists():
                ids, _ = read_labels_csv(sub)
                missing = [pid for pid in ids if pid not in files]
                if missing:
                    raise DataError(f"{len(missing)} ids of {sub} have no file in {folder} "
                                    f"(e.g. {missing[0]}).", path=sub,
                                    fix="Restore the missing test files or the right "
                                        "sample_submission.csv.")
            else:
                ids = sorted(files)
            if not ids:
                raise DataError(f"{folder} holds no images.", path=folder,
                                fix="Put the Kaggle test/*.tif files there.")
            paths, labels = [files[pid] for pid in ids], None
        else:
            raise DataError(f"Kaggle folders have splits 'train' and 'test', not {split!r}.")
        super().__init__(kind="kaggle", root=root, ids=ids, labels=labels,
                         classes=list(PCAM_CLASSES), split=split)
        if split == "test":
            _note_skipped(self, folder, skipped)
        self.paths = paths
        self.folder = folder
        self.confine = (root.resolve(), folder.resolve())

    def unlabelled_files(self) -> list[str]:
        """Files in train/ that have no row in train_labels.csv (names that are not valid
        UTF-8 included, printable: they cannot have a row)."""
        known = set(self.ids)
        skipped: list[str] = []
        files = [p.name for p in _list_images(self.folder, skipped) if p.stem not in known]
        return files + skipped


class ImageFolderSource(FileSource):
    """A flat folder of images, unlabelled (ids are file stems)."""

    expect_size = None

    def __init__(self, root: Path, size: int = PATCH):
        root = Path(root)
        skipped: list[str] = []
        paths = _list_images(root, skipped)
        if not paths:
            raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                            + (f" with UTF-8 file names ({len(skipped)} others)" if skipped
                               else "") + ".", path=root,
                            fix="Point --data at a folder of patches.")
        super().__init__(kind="images", root=root, ids=[p.stem for p in paths], labels=None,
                         classes=list(PCAM_CLASSES), split="test", size=size)
        _note_skipped(self, root, skipped)
        self.paths = paths


class ClassFolderSource(FileSource):
    """root/<class>/*.png|jpg|tif with images of any size, resized to `size`."""

    expect_size = None

    def __init__(self, root: Path, size: int = PATCH):
        root = Path(root)
        class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                      and _utf8_name(d.name)]
        skipped: list[str] = []
        per_class = {d.name: _list_images(d, skipped) for d in class_dirs}
        per_class = {k: v for k, v in per_class.items() if v}
        if len(per_class) != 2:
            raise DataError(f"{root} has {len(per_class)} class folders with images "
                            f"({sorted(per_class)}); pcam-lens classifies two classes.",
                            path=root, fix="Use exactly two sub-folders, e.g. Parasitized/ and "
                                           "Uninfected/.")
        names = sorted(per_class)
        # Put the positive class at index 1 so that probability = P(positive).
        if names[0].lower() in _POSITIVE_NAMES and names[1].lower() not in _POSITIVE_NAMES:
            names = names[::-1]
        ids, labels, paths = [], [], []
        for label, name in enumerate(names):
            for p in per_class[name]:
                ids.append(f"{name}/{p.stem}")
                labels.append(label)
                paths.append(p)
        super().__init__(kind="folders", root=root, ids=ids,
                         labels=np.asarray(labels, dtype=np.int64), classes=names,
                         split="train", size=size)
        _note_skipped(self, root, skipped)
        self.paths = paths


# --------------------------------------------------------------------------- HDF5

H5_PREFIX = "camelyonpatch_level_2_split_"


def _h5_files(root: Path, split: str) -> tuple[Path, Path | None, Path | None]:
    x = root / f"{H5_PREFIX}{split}_x.h5"
    y = root / f"{H5_PREFIX}{split}_y.h5"
    meta = root / f"{H5_PREFIX}{split}_meta.csv"
    return x, (y if y.exists() else None), (meta if meta.exists() else None)


class PcamH5Source(PatchSource):
    """Official PCam HDF5 files, read lazily: only the requested rows are decompressed."""

    def __init__(self, x_path: Path, y_path: Path | None, meta_path: Path | None, split: str,
                 ids_csv: Path | None = None):
        import h5py

        x_path = Path(x_path)
        try:
            with h5py.File(x_path, "r") as f:
                if "x" not in f:
                    raise DataError(f"{x_path} has no dataset 'x' (found {list(f.keys())}).",
                                    path=x_path, fix="Use the official PCam _x.h5 file.")
                shape, dtype = f["x"].shape, f["x"].dtype
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"Cannot open {x_path} as HDF5: {e}.", path=x_path,
                            fix="Re-download the file; it may be truncated.") from None
        if len(shape) != 4 or tuple(shape[1:]) != (PATCH, PATCH, 3) or dtype != np.uint8:
            raise DataError(f"{x_path}: dataset 'x' is {dtype}{list(shape)}, expected uint8 "
                            f"[N,{PATCH},{PATCH},3].", path=x_path,
                            fix="Use the official PCam _x.h5 file.")
        n = int(shape[0])
        if n == 0:
            raise DataError(f"{x_path} holds no patches.", path=x_path,
                            fix="Use a non-empty PCam file.")
        labels = None
        if y_path is not None:
            try:
                with h5py.File(y_path, "r") as f:
                    y = np.asarray(f["y"]).reshape(-1)
            except Exception as e:
                raise DataError(f"Cannot read labels from {y_path}: {e}.", path=y_path,
                                fix="Use the official PCam _y.h5 file.") from None
            if y.shape[0] != n:
                raise DataError(f"{y_path} has {y.shape[0]} labels for {n} patches in {x_path}.",
                                path=y_path, fix="Use the _y.h5 file of the same split.")
            if not np.isin(y, (0, 1)).all():
                raise DataError(f"{y_path} has labels other than 0/1.", path=y_path,
                                fix="Use the official PCam _y.h5 file.")
            labels = y.astype(np.int64)
        ids = [f"{split}-{i:06d}" for i in range(n)]
        if ids_csv is not None and ids_csv.exists():
            # the shared sample maps rows to Kaggle ids; use them when they line up
            with ids_csv.open(encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
            if len(rows) == n and "id" in rows[0]:
                ids = [_check_id(r["id"], ids_csv, k + 2) for k, r in enumerate(rows)]
        groups = None
        if meta_path is not None:
            import pandas as pd

            meta = pd.read_csv(meta_path)
            col = next((c for c in ("wsi", "slide", "slide_id") if c in meta.columns), None)
            if col is not None and len(meta) == n:
                groups = meta[col].astype(str).to_numpy()
        super().__init__(kind="pcam-h5", root=x_path.parent, ids=ids, labels=labels,
                         classes=list(PCAM_CLASSES), split=split, groups=groups)
        self.x_path = x_path
        self._file = None
        self._pid = None

    def _x(self):
        # h5py handles do not survive fork: reopen in each process
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.x_path, "r")
            self._pid = os.getpid()
        return self._file["x"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def read(self, i):
        return np.asarray(self._x()[int(i)])

    def read_batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.empty((0, PATCH, PATCH, 3), np.uint8)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        block = self._x()[uniq]  # h5py wants increasing, unique indices
        out = np.empty((len(idx), PATCH, PATCH, 3), np.uint8)
        out[order] = block[inverse]
        return out

    def describe(self):
        d = super().describe()
        d["path"] = str(self.x_path)
        return d


def _open_h5(path: Path, split: str | None) -> PcamH5Source:
    if path.is_file():
        m = re.match(rf"{H5_PREFIX}(\w+?)_x\.h5$", path.name)
        split = m.group(1) if m else (split or "test")
        y = path.with_name(path.name.replace("_x.h5", "_y.h5"))
        meta = path.with_name(path.name.replace("_x.h5", "_meta.csv"))
        return PcamH5Source(path, y if y.exists() and y != path else None,
                            meta if meta.exists() else None, split, path.parent / "ids.csv")
    present = [s for s in ("train", "valid", "test") if _h5_files(path, s)[0].exists()]
    if split is None or split not in present:
        wanted = {"train": ["train", "valid", "test"], "test": ["test", "valid", "train"],
                  "valid": ["valid", "train", "test"]}.get(split or "train")
        split = next(s for s in wanted if s in present)
    x, y, meta = _h5_files(path, split)
    return PcamH5Source(x, y, meta, split, path / "ids.csv")


# --------------------------------------------------------------------------- opening


def _parse_synthetic(spec: str) -> dict:
    opts = {}
    if ":" in spec:
        for part in spec.split(":", 1)[1].split(","):
            if part.strip():
                k, _, v = part.partition("=")
                if k.strip() not in ("n", "seed") or not v.strip().isdigit():
                    raise DataError(f"Bad synthetic spec {spec!r}.",
                                    fix="Use e.g. synthetic or synthetic:n=2000,seed=0.")
                opts[k.strip()] = int(v)
    return opts


def open_source(spec: str | os.PathLike | None = None, split: str = "train", *,
                size: int = PATCH, use_pack: bool = True) -> PatchSource:
    """Open whatever lies at `spec` (None or "synthetic" means the built-in synthetic set).

    `split` is "train" (labelled data for training/evaluation) or "test" (unlabelled data for
    prediction); sources with only one split ignore it."""
    if spec is None or str(spec).startswith("synthetic"):
        from model.synthetic import SyntheticSource

        opts = _parse_synthetic(str(spec or "synthetic"))
        if split == "test":
            opts.setdefault("seed", 1)  # held-out patches, not the training ones
            opts.setdefault("n", 200)
        return SyntheticSource(**opts)
    path = Path(spec).expanduser()
    if str(path).endswith(".h5.gz") or str(path).endswith(".gz"):
        raise DataError(f"{path} is gzip-compressed.", path=path,
                        fix=f"Decompress it first: gunzip -k {path}")
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.", path=path,
                        fix="Pass --data with a Kaggle folder, a PCam .h5 folder or file, a "
                            "class-folder set, or 'synthetic'.")
    if path.is_file():
        if path.suffix == ".h5":
            return _open_h5(path, split)
        raise DataError(f"{path} is a file; expected a folder or a PCam _x.h5 file.", path=path,
                        fix="Point --data at the data folder.")
    if use_pack:
        from model.pack import open_packed_if_fresh

        packed = open_packed_if_fresh(path, split)
        if packed is not None:
            return packed
    if (path / "train_labels.csv").exists() or (path / "train").is_dir() and split == "train":
        if split == "test" and not (path / "test").is_dir():
            raise DataError(f"{path} has no test/ folder.", path=path,
                            fix="Point --data at the folder that holds test/*.tif.")
        return KaggleSource(path, "test" if split == "test" else "train")
    if (path / "test").is_dir() and split == "test":
        return KaggleSource(path, "test")
    if any(path.glob(f"{H5_PREFIX}*_x.h5")):
        return _open_h5(path, split)
    if any(path.glob(f"{H5_PREFIX}*.h5.gz")):
        raise DataError(f"{path} holds gzip-compressed PCam files.", path=path,
                        fix=f"Decompress them first: gunzip -k {path}/*.h5.gz")
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if _list_images(path) if path.is_dir() else []:
        return ImageFolderSource(path, size=size)
    if subdirs:
        return ClassFolderSource(path, size=size)
    others = sorted(printable_name(f.name) for f in path.iterdir()
                    if f.is_file() and not f.name.startswith("."))
    if others:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}), no "
                        f"train_labels.csv and no PCam .h5 files, only {len(others)} other "
                        f"file(s), e.g. {', '.join(others[:3])}.", path=path,
                        fix="Point --data at a folder that holds patches.")
    raise DataError(f"{path} is empty: no images, no train_labels.csv, no PCam .h5 files.",
                    path=path, fix="Point --data at a folder that holds patches.")


def reopen_source(desc: dict, *, size: int = PATCH) -> PatchSource:
    """Reopen a source from the dict written by `PatchSource.describe()`."""
    if desc.get("synthetic"):
        from model.synthetic import SyntheticSource

        return SyntheticSource(n=desc.get("n"), seed=desc.get("seed", 0))
    return open_source(desc["path"], desc.get("split") or "train", size=size)


def centre_box(size: int = PATCH) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the labelled centre region for a patch of side `size` (exclusive)."""
    c = CENTRE * size // PATCH
    x0 = (size - c) // 2
    return x0, x0, x0 + c, x0 + c
