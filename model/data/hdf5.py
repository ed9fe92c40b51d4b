"""Reader for the official PCam HDF5 files (camelyonpatch_level_2_split_<split>_{x,y}.h5,
optional _meta.csv with slide ids), read lazily: only the requested rows are decompressed."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from model.core.errors import DataError
from model.data.base import PATCH, PCAM_CLASSES, PatchSource
from model.data.files import check_id

H5_PREFIX = "camelyonpatch_level_2_split_"


def h5_files(root: Path, split: str) -> tuple[Path, Path | None, Path | None]:
    x = root / f"{H5_PREFIX}{split}_x.h5"
    y = root / f"{H5_PREFIX}{split}_y.h5"
    meta = root / f"{H5_PREFIX}{split}_meta.csv"
    return x, (y if y.exists() else None), (meta if meta.exists() else None)


class PcamH5Source(PatchSource):
    """Official PCam HDF5 files, read lazily: only the requested rows are decompressed."""

    def __init__(self, x_path: Path, y_path: Path | None, meta_path: Path | None, split: str,
                 ids_csv: Path | None = None):
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
                ids = [check_id(r["id"], ids_csv, k + 2) for k, r in enumerate(rows)]
        groups = None
        if meta_path is not None:

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


def open_h5(path: Path, split: str | None) -> PcamH5Source:
    if path.is_file():
        m = re.match(rf"{H5_PREFIX}(\w+?)_x\.h5$", path.name)
        split = m.group(1) if m else (split or "test")
        y = path.with_name(path.name.replace("_x.h5", "_y.h5"))
        meta = path.with_name(path.name.replace("_x.h5", "_meta.csv"))
        return PcamH5Source(path, y if y.exists() and y != path else None,
                            meta if meta.exists() else None, split, path.parent / "ids.csv")
    present = [s for s in ("train", "valid", "test") if h5_files(path, s)[0].exists()]
    if split is None or split not in present:
        wanted = {"train": ["train", "valid", "test"], "test": ["test", "valid", "train"],
                  "valid": ["valid", "train", "test"]}.get(split or "train")
        split = next(s for s in wanted if s in present)
    x, y, meta = h5_files(path, split)
    return PcamH5Source(x, y, meta, split, path / "ids.csv")


