"""The cross-validation directory that `python -m model.crossval` writes, and how it is read.

    <cv>/cv.json                the configuration (resolved), data provenance, status
    <cv>/folds.csv              id, label, fold: the held-out fold of every labelled patch
    <cv>/folds/fold-<k>.csv     the ids fold k holds out (its run's --valid-ids)
    <cv>/fold-<k>/              an ordinary run directory trained without fold k's patches
    <cv>/features/              the cached pooled features (model.evaluation.features)
    <cv>/oof_predictions.csv    one row per labelled patch: id, label, fold, prob (mean of the
                                TTA views), tta_spread, p_view0..7, label_quality,
                                suggested_label, label_issue, issue_rank
    <cv>/cv_metrics.json        OOF AUC with its CI, per-fold AUC, timings (written last)

Everything here reads and validates; the writing is model.oof.crossval.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.core.errors import RunError
from model.data.base import PatchSource, ids_fingerprint
from model.runs.format import read_json
from model.runs.summary import same_source

CV_FORMAT = "pcam-lens-crossval"
CV_FORMAT_VERSION = 1
OOF_FILE = "oof_predictions.csv"
OOF_COLUMNS = ("id", "label", "fold", "prob", "tta_spread", "label_quality", "suggested_label",
               "label_issue", "issue_rank")


def is_crossval(path) -> bool:
    return (Path(path) / "cv.json").is_file()


def fold_dir(cv_dir: Path, k: int) -> Path:
    return Path(cv_dir) / f"fold-{k}"


def read_cv(cv_dir) -> dict:
    """cv.json of a cross-validation directory; RunError when missing, broken or foreign."""
    cv_dir = Path(cv_dir)
    path = cv_dir / "cv.json"
    if not path.is_file():
        raise RunError(f"{cv_dir} is not a cross-validation directory (no cv.json).", path=cv_dir,
                       fix="Pass the folder python -m model.crossval wrote (--run-dir).")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({e}).", path=path,
                       fix="Restore cv.json, or run the cross-validation again.") from None
    if not isinstance(cfg, dict) or cfg.get("format") != CV_FORMAT:
        raise RunError(f"{path} is not a pcam-lens cross-validation file.", path=path,
                       fix="Pass the folder python -m model.crossval wrote.")
    version = cfg.get("format_version")
    if version != CV_FORMAT_VERSION:
        raise RunError(f"{path} has cross-validation format {version!r}; this pcam-lens reads "
                       f"format {CV_FORMAT_VERSION}.", path=path,
                       fix="Run the cross-validation again with this version "
                           "(python -m model.crossval).")
    return cfg


@dataclass(frozen=True)
class CrossVal:
    """A complete cross-validation: its directory, cv.json and its fold run directories."""

    dir: Path
    config: dict
    metrics: dict

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def k(self) -> int:
        return int(self.config["config"]["folds"])

    @property
    def fold_dirs(self) -> list[Path]:
        return [fold_dir(self.dir, k) for k in range(self.k)]

    @property
    def oof_path(self) -> Path:
        return self.dir / OOF_FILE

    def belongs_to(self, source: PatchSource) -> bool:
        """Were the OOF predictions made for these patches? (same data source, and every
        OOF id is one of the source's)"""
        return same_source(self.config.get("data") or {}, source.describe())

    @property
    def label(self) -> str:
        auc = self.metrics.get("oof_auc")
        return (f"{self.name} · {self.k}-fold cross-validation"
                + (f" · OOF AUC {auc:.3f}" if isinstance(auc, (int, float)) else ""))


def open_crossval(cv_dir) -> CrossVal:
    """A complete cross-validation directory; RunError when it is not (yet) one."""
    cv_dir = Path(cv_dir)
    cfg = read_cv(cv_dir)
    metrics = read_json(cv_dir / "cv_metrics.json")
    if cfg.get("status") != "complete" or metrics is None or not (cv_dir / OOF_FILE).exists():
        raise RunError(f"The cross-validation in {cv_dir} has not finished.", path=cv_dir,
                       fix=f"Finish it: python -m model.crossval --resume {cv_dir}")
    return CrossVal(cv_dir, cfg, metrics)


def find_crossvals(root, source: PatchSource | None = None) -> list[CrossVal]:
    """Complete cross-validations under `root` (its direct subfolders), newest first; only
    those made on `source` when it is given."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("*/cv.json"):
        try:
            cv = open_crossval(p.parent)
        except RunError:
            continue
        if source is None or cv.belongs_to(source):
            found.append(cv)
    return sorted(found, key=lambda c: c.oof_path.stat().st_mtime, reverse=True)


def read_oof(cv: CrossVal, source: PatchSource | None = None) -> pd.DataFrame:
    """oof_predictions.csv, checked: its columns, one row per id, probabilities in [0, 1], the
    recorded fingerprint of its ids and, with `source`, that its ids are the source's."""
    path = cv.oof_path
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read ({e}).", path=path,
                       fix=f"Run python -m model.crossval --resume {cv.dir} again.") from None
    missing = [c for c in OOF_COLUMNS if c not in df.columns]
    if missing:
        raise RunError(f"{path} lacks column(s) {missing}: it was written by another version "
                       "or edited.", path=path,
                       fix="Run the cross-validation again with this version.")
    prob = pd.to_numeric(df["prob"], errors="coerce")
    if prob.isna().any() or (prob < 0).any() or (prob > 1).any() or df["id"].duplicated().any():
        raise RunError(f"{path} has probabilities outside [0, 1] or repeated ids.", path=path,
                       fix="Run the cross-validation again.")
    want = cv.metrics.get("ids_fingerprint")
    if want and ids_fingerprint(list(df["id"])) != want:
        raise RunError(f"{path} does not hold the ids its cross-validation recorded.", path=path,
                       fix="Run the cross-validation again.")
    if source is not None:
        if not cv.belongs_to(source):
            raise RunError(f"The OOF predictions in {cv.dir} were made on other data than "
                           f"{source.describe_short()}.", path=path,
                           fix="Choose the data source the cross-validation was run on.")
        known = pd.Index(source.ids)
        absent = int((known.get_indexer(df["id"]) < 0).sum())
        if absent:
            raise RunError(f"{absent} ids of {path} are not in {source.describe_short()}.",
                           path=path, fix="Choose the data source the cross-validation was "
                                          "run on, or run it again on this one.")
    df["label_issue"] = df["label_issue"].astype(bool)
    return df


def view_columns(table) -> list[str]:
    """The per-view probability columns p_view0.. of a DataFrame (or the fields of a row
    Series), in view order."""
    names = table.columns if isinstance(table, pd.DataFrame) else table.index
    cols = [str(c) for c in names if str(c).startswith("p_view")]
    return sorted(cols, key=lambda c: int(c[len("p_view"):]))
