"""Open whatever lies at a path as a patch source: the factory above all the readers.

- a Kaggle folder: train/<id>.tif + train_labels.csv, test/<id>.tif, sample_submission.csv
- official PCam HDF5: camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (a folder or one
  _x.h5 file), read lazily
- a flat folder of images (unlabelled, e.g. a test folder)
- folder per class: root/<class>/*.png|jpg|tif, any size, resized to `size`
- "synthetic" (optionally "synthetic:n=2000,seed=0"): the built-in procedural set
- a packed cache (model.data.pack) is used transparently when a fresh one exists
"""
from __future__ import annotations

import os
from pathlib import Path

from model.core.errors import DataError
from model.data.base import PATCH, PatchSource
from model.data.files import list_images, printable_name
from model.data.folders import ClassFolderSource, ImageFolderSource
from model.data.hdf5 import H5_PREFIX, open_h5
from model.data.images import IMAGE_SUFFIXES
from model.data.kaggle import KaggleSource
from model.data.pack import open_packed_if_fresh
from model.data.slides import SlideTileSource, is_slide_folder
from model.data.synthetic import SyntheticSource


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
            return open_h5(path, split)
        raise DataError(f"{path} is a file; expected a folder or a PCam _x.h5 file.", path=path,
                        fix="Point --data at the data folder.")
    if use_pack:

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
        return open_h5(path, split)
    if is_slide_folder(path):
        raise DataError(f"{path} is a folder of whole-slide images, not of patches.", path=path,
                        fix="Make heatmaps with python -m model.slide RUN --slide "
                            f"{path}; to train on the slide patches reviewed on the Slide "
                            f"page, use model.train --data {path} --labels-from-review.")
    if any(path.glob(f"{H5_PREFIX}*.h5.gz")):
        raise DataError(f"{path} holds gzip-compressed PCam files.", path=path,
                        fix=f"Decompress them first: gunzip -k {path}/*.h5.gz")
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if list_images(path) if path.is_dir() else []:
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

        return SyntheticSource(n=desc.get("n"), seed=desc.get("seed", 0))
    if desc.get("kind") == "slide-tiles":  # reviewed slide patches: the ids are the data
        return SlideTileSource(Path(desc["path"]), desc["tile_ids"], desc.get("tile_labels"),
                               mpp=desc.get("mpp"))
    return open_source(desc["path"], desc.get("split") or "train", size=size)


