"""Readers for plain folders: a flat folder of unlabelled images, and one folder per class
(e.g. the NIH malaria cells) with images of any size resized to the patch size."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model.core.errors import DataError
from model.data.base import PATCH, PCAM_CLASSES
from model.data.files import FileSource, list_images, note_skipped, utf8_name
from model.data.images import IMAGE_SUFFIXES

# Folder names that mean "the positive class" in binary class-folder sets, so that
# probability = P(positive) whatever the alphabetical order is.
_POSITIVE_NAMES = {"1", "positive", "pos", "tumor", "tumour", "cancer", "malignant",
                   "metastasis", "parasitized", "parasitised", "infected"}


class ImageFolderSource(FileSource):
    """A flat folder of images, unlabelled (ids are file stems)."""

    expect_size = None

    def __init__(self, root: Path, size: int = PATCH):
        root = Path(root)
        skipped: list[str] = []
        paths = list_images(root, skipped)
        if not paths:
            raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                            + (f" with UTF-8 file names ({len(skipped)} others)" if skipped
                               else "") + ".", path=root,
                            fix="Point --data at a folder of patches.")
        super().__init__(kind="images", root=root, ids=[p.stem for p in paths], labels=None,
                         classes=list(PCAM_CLASSES), split="test", size=size)
        note_skipped(self, root, skipped)
        self.paths = paths


class ClassFolderSource(FileSource):
    """root/<class>/*.png|jpg|tif with images of any size, resized to `size`."""

    expect_size = None

    def __init__(self, root: Path, size: int = PATCH):
        root = Path(root)
        class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                      and utf8_name(d.name)]
        skipped: list[str] = []
        per_class = {d.name: list_images(d, skipped) for d in class_dirs}
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
        note_skipped(self, root, skipped)
        self.paths = paths


