"""The review queue as a table, for review outside the viewer (`python -m model.queue`).

A cross-validation directory gives the queue over every labelled patch (out-of-fold
predictions, with cleanlab's label quality and the TTA spread); a run directory gives its
validation split. Patches that already have a decision in the review log are left out, as in
the viewer, and every row says where the patch's pixels are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.core.errors import PcamLensError, RunError
from model.data.open import reopen_source
from model.evaluation.metrics import complete_prediction_table
from model.review.log import ReviewLog, default_log_path, review_queue
from model.runs.crossval import is_crossval, open_crossval, read_oof
from model.runs.format import read_config

COLUMNS = ("rank", "id", "label", "prob", "loss", "label_quality", "suggested_label",
           "label_issue", "issue_rank", "tta_spread", "fold", "path")


@dataclass
class Queue:
    table: pd.DataFrame  # in review order, columns COLUMNS (those that exist)
    origin: str
    n_done: int
    n_total: int
    log_path: Path


def _source_or_none(desc: dict):
    try:
        return reopen_source(desc)
    except PcamLensError:
        return None  # the queue still lists ids; pixels' paths are then unknown


def _run_predictions(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "valid_predictions.csv"
    try:
        return pd.read_csv(path, dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RunError(f"{run_dir} has no readable valid_predictions.csv ({e}).", path=path,
                       fix="Pass a run that has finished an epoch, or a cross-validation "
                           "directory.") from None


def build_queue(path, order: str = "label_errors", *, log_path=None,
                include_reviewed: bool = False) -> Queue:
    """The queue of `path` (a cross-validation or run directory) in `order`
    (model.review.log.QUEUE_ORDERS)."""
    path = Path(path)
    if is_crossval(path):
        cv = open_crossval(path)
        desc = cv.config.get("data") or {}
        source = _source_or_none(desc)
        df = read_oof(cv, source)
        origin = (f"out-of-fold predictions of {cv.k}-fold cross-validation {cv.name} "
                  f"({len(df):,} labelled patches)")
    else:
        desc = read_config(path).get("data") or {}
        source = _source_or_none(desc)
        df = _run_predictions(path)
        origin = f"validation split of run {path.name} ({len(df):,} patches)"
    df = complete_prediction_table(df)
    root = None if desc.get("synthetic") else desc.get("path")
    log = Path(log_path) if log_path else default_log_path(root)
    reviewed = ReviewLog(log).reviewed_ids() if log.exists() and not include_reviewed else ()
    queue, done, total = review_queue(df, order, reviewed)
    queue = queue.reset_index(drop=True)
    queue.insert(0, "rank", range(1, len(queue) + 1))
    if source is not None:
        pos = pd.Index(source.ids).get_indexer(queue["id"])
        queue["path"] = [str(source.path_of(int(i)) or "") if i >= 0 else "" for i in pos]
    cols = [c for c in COLUMNS if c in queue.columns]
    return Queue(queue[cols], origin, done, total, log)
