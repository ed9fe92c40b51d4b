"""The patch-source interface every reader implements, and the PCam constants.

A source exposes `ids`, `labels` (int64 class indices, or None for unlabelled data),
`classes`, optional `groups` (slide ids, for grouped splits) and random access to uint8 RGB
arrays through `read(i)` / `read_batch(indices)`. The readers (kaggle, hdf5, folders,
synthetic, pack) subclass `PatchSource`; `model.data.open.open_source` picks one from a path.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.core.errors import DataError

PATCH = 96  # PCam patch side in pixels
CENTRE = 32  # the labelled centre region side in pixels
PCAM_CLASSES = ["no tumour", "tumour"]


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



def centre_box(size: int = PATCH) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the labelled centre region for a patch of side `size` (exclusive)."""
    c = CENTRE * size // PATCH
    x0 = (size - c) // 2
    return x0, x0, x0 + c, x0 + c


def ids_fingerprint(ids: Sequence[str]) -> str:
    """sha1 of the ids in order: ties a report or a cache to the exact source it was made
    for."""
    h = hashlib.sha1()
    for pid in ids:
        h.update(pid.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()
