"""Validation splits: stratified and seeded by default, grouped by slide when the data has
slide ids (patches of one slide never sit on both sides), or a given list of ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.errors import DataError
from model.data.base import PatchSource
from model.data.files import read_labels_csv


@dataclass
class Split:
    train_idx: np.ndarray
    valid_idx: np.ndarray
    method: str
    seed: int
    valid_pct: float

    def describe(self) -> dict:
        return {"method": self.method, "seed": self.seed, "valid_pct": self.valid_pct,
                "n_train": int(len(self.train_idx)), "n_valid": int(len(self.valid_idx)),
                "valid_ids_file": "valid_ids.csv"}


def stratified_split(labels: np.ndarray, valid_pct: float, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    valid = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        valid.append(idx[:max(1, round(len(idx) * valid_pct))])
    valid_idx = np.sort(np.concatenate(valid))
    train_idx = np.setdiff1d(np.arange(len(labels)), valid_idx)
    return Split(train_idx, valid_idx, "stratified", seed, valid_pct)


def grouped_split(labels: np.ndarray, groups: np.ndarray, valid_pct: float, seed: int) -> Split:
    """Whole slides go to validation until it holds about `valid_pct` of the patches,
    stratified as far as slides allow (StratifiedGroupKFold with k = round(1/valid_pct))."""
    from sklearn.model_selection import StratifiedGroupKFold  # seconds to import: only here

    k = max(2, round(1 / valid_pct))
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    train_idx, valid_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return Split(np.sort(train_idx), np.sort(valid_idx), "grouped-by-slide", seed, valid_pct)


def ids_split(source: PatchSource, ids_file: Path) -> Split:
    ids_file = Path(ids_file)
    if not ids_file.exists():
        raise DataError(f"Validation id list {ids_file} does not exist.", path=ids_file,
                        fix="Pass a CSV with an 'id' column (e.g. a run's valid_ids.csv).")

    try:
        ids = pd.read_csv(ids_file, dtype=str, encoding="utf-8-sig")["id"].str.strip()
    except (KeyError, ValueError) as e:
        raise DataError(f"{ids_file} has no 'id' column ({e}).", path=ids_file,
                        fix="Use a CSV with an 'id' column.") from None
    pos = {pid: k for k, pid in enumerate(source.ids)}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise DataError(f"{len(missing)} validation ids in {ids_file} are not in the data "
                        f"(e.g. {missing[0]}).", path=ids_file,
                        fix="Use an id list made for this data set.")
    valid_idx = np.sort(np.fromiter((pos[i] for i in ids), np.int64, len(ids)))
    train_idx = np.setdiff1d(np.arange(len(source)), valid_idx)
    return Split(train_idx, valid_idx, f"ids:{ids_file.name}", 0,
                 round(len(valid_idx) / len(source), 4))


def make_split(source: PatchSource, valid_pct: float = 0.2, seed: int = 0,
               valid_ids: Path | None = None, method: str = "auto") -> Split:
    """Choose the split: a given id list, else grouped when slide ids exist, else stratified."""
    if source.labels is None:
        raise DataError(f"{source.describe_short()} has no labels; training needs labels.",
                        fix="Point --data at labelled data (train_labels.csv, a _y.h5 file or "
                            "class folders).")
    if valid_ids is not None:
        return ids_split(source, valid_ids)
    if not 0 < valid_pct < 1:
        raise DataError(f"--valid-pct must be between 0 and 1, got {valid_pct}.")
    if method in ("auto", "grouped") and source.groups is not None:
        return grouped_split(source.labels, source.groups, valid_pct, seed)
    if method == "grouped":
        raise DataError("--split grouped needs slide ids (a PCam *_meta.csv beside the .h5).")
    return stratified_split(source.labels, valid_pct, seed)


def read_valid_ids(path: Path) -> list[str]:
    ids, _ = read_labels_csv(Path(path))
    return ids


def check_folds(labels: np.ndarray, k: int, groups: np.ndarray | None = None) -> None:
    """DataError unless `k` folds can each hold out patches of every class (and, grouped,
    whole slides): K >= 2, at least K patches of each class, at least K slides."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise DataError(f"Cross-validation needs at least 2 folds; got --folds {k!r}.",
                        fix="Use --folds 5 (the default) or another whole number >= 2.")
    n = len(labels)
    if n < 2 * k:
        raise DataError(f"{n} labelled patches are too few for {k} folds (each fold needs "
                        "patches to train on and to hold out).",
                        fix=f"Use fewer folds (--folds {max(2, n // 2)}) or more data.")
    values, counts = np.unique(labels, return_counts=True)
    if len(values) < 2:
        raise DataError(f"All {n} labelled patches have label {values[0]}; out-of-fold "
                        "predictions need both classes.", fix="Use data with both classes.")
    small = [(int(v), int(c)) for v, c in zip(values, counts) if c < k]
    if small:
        v, c = small[0]
        raise DataError(f"Class {v} has only {c} patches, fewer than the {k} folds: some fold "
                        "would hold out none of them.",
                        fix=f"Use --folds {max(2, c)} or fewer, or add patches of class {v}.")
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise DataError(f"The data has {n_groups} slides, fewer than the {k} folds (folds "
                            "are grouped by slide: a slide is never on both sides).",
                            fix=f"Use --folds {max(2, n_groups)} or fewer.")


def fold_assignment(labels: np.ndarray, k: int, seed: int = 0,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """The held-out fold (0..k-1) of every patch: stratified by label, and grouped by slide
    when `groups` is given (all patches of a slide share a fold: StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # slow import

    check_folds(labels, k, groups)
    fold = np.full(len(labels), -1, np.int64)
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels, groups)
    else:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels)
    for f, (_, held) in enumerate(parts):
        fold[held] = f
    if (fold < 0).any() or len(np.unique(fold)) != k:
        raise DataError(f"Could not make {k} non-empty folds of these patches.",
                        fix="Use fewer folds.")
    return fold
