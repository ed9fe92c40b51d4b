"""Evaluation metrics for a binary patch classifier, shared by the evaluation CLI and the viewer.

Everything here is pure numpy / pandas / scikit-learn: no torch, no plotting, no Streamlit, so
the CLI and the viewer compute exactly the same numbers from the same predictions.

Conventions used throughout:

- `labels` is a 1-D array of 0/1 (bools and 0.0/1.0 floats are accepted), 1 = positive (tumour).
- `probs` is a 1-D array of P(class 1) in [0, 1], the same length as `labels`.
- A patch is predicted positive when `prob >= threshold`.
- Bad input (empty arrays, mismatched lengths, labels other than 0/1, probabilities outside
  [0, 1] or NaN, a single class where a metric needs both) raises `model.core.errors.DataError`
  with a message saying what is wrong, so the CLI can print it and the viewer can `st.error` it.
- Functions return plain data: floats, dicts, numpy arrays, pandas DataFrames. Only `summary`
  promises JSON-ready values (undefined rates become None there; elsewhere they are NaN so
  they stay numeric for tables and plots).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from model.core.errors import DataError

# Working memory for one bootstrap chunk, in array elements (int64): the chunk's count matrix
# and gathered cumulative counts together stay around a few tens of MB whatever the data size.
_BOOT_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _as_arrays(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert inputs to (int64 labels, float64 probs).

    float64 on purpose: float32 probabilities near 0/1 lose the precision that the log loss
    and the ranking ties depend on."""
    y = np.asarray(labels)
    p = _float_array(probs)
    if y.ndim != 1 or p.ndim != 1:
        raise DataError(
            f"labels and probs must be 1-D arrays; got shapes {y.shape} and {p.shape}.",
            fix="pass one probability per patch, P(class 1), e.g. probs[:, 1] for a two-column "
                "softmax output.")
    if len(y) != len(p):
        raise DataError(f"labels has {len(y)} entries but probs has {len(p)}; they must match.")
    if len(y) == 0:
        raise DataError("No predictions to evaluate: labels and probs are empty.")
    y = _binary_labels(y)
    if not np.all(np.isfinite(p)):
        bad = int(np.count_nonzero(~np.isfinite(p)))
        raise DataError(f"probs contains {bad} NaN or infinite value(s).",
                        fix="check the model output; every patch needs a probability.")
    if p.min() < 0.0 or p.max() > 1.0:
        raise DataError(
            f"probs must be probabilities in [0, 1]; got values from {p.min():g} to {p.max():g}.",
            fix="apply a sigmoid/softmax to the model's logits first.")
    return y, p


def _float_array(probs) -> np.ndarray:
    """probs as float64; strings or other non-numbers (e.g. from a bad CSV) are a DataError."""
    try:
        return np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"probs contains values that are not numbers ({e}).") from None


def _binary_labels(y: np.ndarray) -> np.ndarray:
    """Labels as int64 0/1; anything else (2, -1, 0.5, NaN, strings) is an error, not a guess."""
    if y.dtype == bool:
        return y.astype(np.int64)
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"labels must be 0/1 numbers; got dtype {y.dtype}.") from None
    ok = (yf == 0.0) | (yf == 1.0)
    if not np.all(ok):
        bad = np.unique(y[~ok])[:5].tolist()
        raise DataError(f"labels must be 0 or 1; found other values such as {bad}.",
                        fix="binary evaluation needs labels 0 (negative) and 1 (positive).")
    return yf.astype(np.int64)


def _require_both_classes(y: np.ndarray, what: str) -> None:
    """Ranking metrics compare positives with negatives, so both must be present."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        only = "positive (1)" if n_pos else "negative (0)"
        raise DataError(
            f"{what} needs both classes, but all {len(y)} labels are {only}.",
            fix="evaluate on a set that contains both tumour and non-tumour patches.")


def _safe_div(num: float, den: float) -> float:
    """Ratio, or NaN when the denominator is 0 (e.g. precision with no positive predictions)."""
    return float(num) / float(den) if den else math.nan


# --------------------------------------------------------------------------------------------
# ROC AUC and its bootstrap confidence interval
# --------------------------------------------------------------------------------------------

def roc_auc(labels, probs) -> float:
    """Area under the ROC curve (scikit-learn's roc_auc_score; ties count half).

    Raises DataError when only one class is present, instead of sklearn's ValueError, because
    that is an input problem the user can fix."""
    y, p = _as_arrays(labels, probs)
    _require_both_classes(y, "ROC AUC")
    return float(roc_auc_score(y, p))


def _resampled_aucs(pos: np.ndarray, neg: np.ndarray, pos_idx: np.ndarray,
                    neg_idx: np.ndarray) -> np.ndarray:
    """AUC of each bootstrap replicate b, whose data are pos[pos_idx[b]] and neg[neg_idx[b]].

    Mann-Whitney form: AUC = mean over (positive, negative) pairs of [s_pos > s_neg] + 0.5 *
    [s_pos == s_neg]. Sorting the negatives once lets every replicate reuse the same search
    positions: for a positive score s, `lo` = #negatives below s and `hi` = #negatives <= s in
    the sorted order, so with C = cumulative counts of the replicate's negatives in that order,
    the positive contributes (C[lo] + C[hi]) / 2. Cost per replicate is O(n), with no sorting and
    no Python loop over replicates inside a chunk.
    """
    n_boot, n_pos = pos_idx.shape
    n_neg = neg_idx.shape[1]
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    rank = np.empty(n_neg, dtype=np.int64)
    rank[order] = np.arange(n_neg)
    lo = np.searchsorted(neg_sorted, pos, side="left")
    hi = np.searchsorted(neg_sorted, pos, side="right")

    # How many times each (sorted) negative was drawn in each replicate: one bincount over
    # row-offset positions instead of n_boot separate calls.
    flat = (rank[neg_idx] + (np.arange(n_boot) * n_neg)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_neg).reshape(n_boot, n_neg)
    cum = np.zeros((n_boot, n_neg + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=cum[:, 1:])

    below = np.take_along_axis(cum, lo[pos_idx], axis=1)
    upto = np.take_along_axis(cum, hi[pos_idx], axis=1)
    # Integer sums are exact; divide once at the end (2x because ties count half).
    twice_wins = below.sum(axis=1) + upto.sum(axis=1)
    return twice_wins / (2.0 * n_pos * n_neg)


def bootstrap_aucs(labels, probs, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """ROC AUC of `n_boot` stratified bootstrap replicates.

    Stratified: positives and negatives are resampled separately, each to its original count,
    so every replicate has both classes (an unstratified replicate can lose the minority class
    and have no AUC) and the class balance of the evaluation set is kept."""
    y, p = _as_arrays(labels, probs)
    _require_both_classes(y, "Bootstrap ROC AUC")
    if int(n_boot) < 1:
        raise DataError(f"n_boot must be at least 1; got {n_boot}.")
    n_boot = int(n_boot)
    pos, neg = p[y == 1], p[y == 0]
    # One child seed per replicate: replicate b is the same whatever n_boot or the chunk size,
    # so a 200-replicate run is a prefix of a 1000-replicate one with the same seed.
    seeds = np.random.SeedSequence(seed).spawn(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // len(p))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        pos_idx = np.empty((b, len(pos)), dtype=np.int64)
        neg_idx = np.empty((b, len(neg)), dtype=np.int64)
        for row, child in enumerate(seeds[start:start + b]):
            rng = np.random.default_rng(child)
            pos_idx[row] = rng.integers(0, len(pos), size=len(pos))
            neg_idx[row] = rng.integers(0, len(neg), size=len(neg))
        out[start:start + b] = _resampled_aucs(pos, neg, pos_idx, neg_idx)
    return out


def bootstrap_auc_ci(labels, probs, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile (1 - alpha) confidence interval of the ROC AUC, from a stratified bootstrap.

    Deterministic for a given seed. 1000 replicates on 50k patches take about a second."""
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha must be between 0 and 1 (e.g. 0.05 for a 95% interval); "
                        f"got {alpha}.")
    aucs = bootstrap_aucs(labels, probs, n_boot=n_boot, seed=seed)
    lo, hi = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# Threshold metrics
# --------------------------------------------------------------------------------------------

def _counts(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) with prediction = prob >= threshold."""
    pred = p >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(np.count_nonzero(~pred & ~pos))
    return tn, fp, fn, tp


def confusion_at(labels, probs, threshold: float = 0.5) -> dict:
    """Confusion counts and the usual rates at one threshold (positive when prob >= threshold).

    Keys: threshold, tn, fp, fn, tp (ints) and sensitivity (TPR, recall), specificity (TNR), fpr,
    precision (PPV), npv, accuracy, f1 (floats). A rate whose denominator is 0 (e.g. precision
    when nothing is predicted positive) is NaN rather than a made-up 0."""
    y, p = _as_arrays(labels, probs)
    tn, fp, fn, tp = _counts(y, p, threshold)
    return {
        "threshold": float(threshold),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "fpr": _safe_div(fp, fp + tn),
        "precision": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "accuracy": _safe_div(tp + tn, len(y)),
        # 2TP / (2TP + FP + FN) equals 2PR / (P + R) but stays defined (0) when TP = 0.
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def threshold_for_sensitivity(labels, probs, target: float = 0.95) -> dict:
    """The highest threshold whose sensitivity is >= target, and what it achieves.

    Screening use: "catch at least 95% of tumours, with as few false alarms as possible". The
    highest such threshold maximises specificity under the sensitivity constraint. It is always
    one of the positive patches' probabilities: with k = the fewest positives that reach the
    target, it is the k-th highest positive probability (any higher threshold keeps fewer than k).

    Returns a dict: target, threshold, sensitivity, specificity, tp, fp."""
    y, p = _as_arrays(labels, probs)
    _require_both_classes(y, "threshold_for_sensitivity")
    if not 0.0 < target <= 1.0:
        raise DataError(f"target sensitivity must be in (0, 1]; got {target}.")
    pos_desc = np.sort(p[y == 1])[::-1]
    n_pos = len(pos_desc)
    k = _min_count_reaching(target, n_pos)
    threshold = float(pos_desc[k - 1])
    tn, fp, fn, tp = _counts(y, p, threshold)
    return {
        "target": float(target),
        "threshold": threshold,
        # Ties at the threshold can push sensitivity above k / n_pos; report what is achieved.
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "tp": tp,
        "fp": fp,
    }


def _min_count_reaching(target: float, n: int) -> int:
    """Smallest k in 1..n with k / n >= target, using the same float comparison as the check.

    Plain ceil(target * n) can be off by one from rounding (0.28 * 25 = 7.000000000000001)."""
    k = min(max(int(math.ceil(target * n)), 1), n)
    while k > 1 and (k - 1) / n >= target:
        k -= 1
    while k < n and k / n < target:
        k += 1
    return k


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------

def roc_points(labels, probs) -> pd.DataFrame:
    """ROC curve as a DataFrame with columns fpr, tpr, threshold (fpr increasing).

    Uses sklearn's roc_curve with drop_intermediate=True (collinear points removed; the curve
    and its area are unchanged, the table is much smaller). sklearn's first threshold is +inf
    (the "predict nothing" point); it is replaced by 1.0 so the table survives JSON and CSV."""
    y, p = _as_arrays(labels, probs)
    _require_both_classes(y, "ROC curve")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=True)
    thr = np.where(np.isinf(thr), 1.0, thr)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr.astype(np.float64)})


def pr_points(labels, probs) -> pd.DataFrame:
    """Precision-recall curve as a DataFrame with columns recall, precision, threshold.

    Rows run from the "predict nothing" point (recall 0, precision 1, threshold 1.0; sklearn
    gives it no threshold) to the lowest threshold, i.e. recall increasing like fpr in
    `roc_points`. Needs at least one positive (recall is undefined otherwise)."""
    y, p = _as_arrays(labels, probs)
    _require_positive(y, "Precision-recall curve")
    precision, recall, thr = precision_recall_curve(y, p)
    thr = np.append(thr, 1.0)
    # sklearn returns recall decreasing; reverse so both curve tables read in the same order.
    return pd.DataFrame({"recall": recall[::-1], "precision": precision[::-1],
                         "threshold": thr[::-1].astype(np.float64)})


def average_precision(labels, probs) -> float:
    """Average precision (sklearn's average_precision_score: step-wise area, no interpolation)."""
    y, p = _as_arrays(labels, probs)
    _require_positive(y, "Average precision")
    return float(average_precision_score(y, p))


def _require_positive(y: np.ndarray, what: str) -> None:
    """Precision-recall metrics are about finding positives: without any, they are undefined."""
    if not y.any():
        raise DataError(f"{what} needs at least one positive (label 1); all {len(y)} labels "
                        f"are 0.", fix="evaluate on a set that contains tumour patches.")


# --------------------------------------------------------------------------------------------
# Calibration and per-patch losses
# --------------------------------------------------------------------------------------------

def calibration(labels, probs, n_bins: int = 10) -> tuple[pd.DataFrame, float]:
    """Reliability table over equal-width probability bins, and the expected calibration error.

    Returns (bins, ece). `bins` has one row per bin, empty ones included so the table always has
    n_bins rows: bin_lo, bin_hi, count, mean_prob, frac_pos (the last two NaN when count is 0).
    Bin edges and assignment match sklearn's calibration_curve(strategy="uniform"), so the two
    tables agree: bins are right-closed, (bin_lo, bin_hi], except that the first also holds 0.0.
    ECE = sum over bins of count / n * |frac_pos - mean_prob|."""
    y, p = _as_arrays(labels, probs)
    n_bins = int(n_bins)
    if n_bins < 1:
        raise DataError(f"n_bins must be at least 1; got {n_bins}.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the inner edges, exactly as sklearn does, rather than floor(p * n_bins):
    # the latter disagrees with the edges for values such as 0.3 through float rounding.
    idx = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(idx, minlength=n_bins)
    sum_prob = np.bincount(idx, weights=p, minlength=n_bins)
    sum_pos = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(count > 0, sum_prob / count, np.nan)
        frac_pos = np.where(count > 0, sum_pos / count, np.nan)
    bins = pd.DataFrame({"bin_lo": edges[:-1], "bin_hi": edges[1:], "count": count,
                         "mean_prob": mean_prob, "frac_pos": frac_pos})
    filled = count > 0
    ece = float(np.sum(count[filled] / len(y) * np.abs(frac_pos[filled] - mean_prob[filled])))
    return bins, ece


def brier(labels, probs) -> float:
    """Brier score: mean squared difference between probability and label (lower is better)."""
    y, p = _as_arrays(labels, probs)
    return float(np.mean((p - y) ** 2))


def per_patch_losses(labels, probs, eps: float = 1e-7) -> np.ndarray:
    """Binary cross-entropy of each patch, in nats.

    Probabilities are clipped to [eps, 1 - eps] so a confidently wrong 0.0 or 1.0 gives a large
    finite loss (-log eps, about 16 for 1e-7) instead of inf, which would break sorting/means."""
    y, p = _as_arrays(labels, probs)
    q = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(q) + (1 - y) * np.log1p(-q))


# --------------------------------------------------------------------------------------------
# Prediction tables
# --------------------------------------------------------------------------------------------

def prediction_table(ids, labels, probs, threshold: float = 0.5) -> pd.DataFrame:
    """One row per patch: id, label, prob, loss, pred, correct (labels may be None: then label,
    loss and correct are NaN)."""
    df = pd.DataFrame({"id": [str(i) for i in ids], "prob": np.asarray(probs, np.float64)})
    df["label"] = np.nan if labels is None else np.asarray(labels)
    return complete_prediction_table(df, threshold)


def complete_prediction_table(df: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """A copy of `df` (id, prob and, when labelled, label) with loss, pred and correct filled
    in: the table model.evaluate writes and the viewer shows. A recorded loss column is kept."""
    df = df.copy()
    df["id"] = df["id"].astype(str)
    lab = pd.to_numeric(df["label"], errors="coerce") if "label" in df else None
    if lab is None or lab.isna().any():
        df["label"] = lab if lab is not None else np.nan
        df["loss"] = np.nan
    else:
        df["label"] = lab.astype(np.int64)
        if "loss" not in df:
            df["loss"] = per_patch_losses(lab.to_numpy(), df["prob"].to_numpy())
    df["pred"] = (df["prob"] >= threshold).astype(np.int64)
    labelled = not df["label"].isna().any()
    df["correct"] = (df["pred"] == df["label"]) if labelled else np.nan
    return df[["id", "label", "prob", "loss", "pred", "correct",
               *[c for c in df.columns if c not in ("id", "label", "prob", "loss", "pred",
                                                    "correct")]]]


# --------------------------------------------------------------------------------------------
# Example sets for the viewer
# --------------------------------------------------------------------------------------------

def sample_sets(df: pd.DataFrame, k: int = 16, seed: int = 0,
                threshold: float = 0.5) -> dict[str, pd.DataFrame]:
    """Patches worth looking at, as DataFrames of at most k rows each.

    `df` needs columns id, label, prob; a missing `loss` column is computed. Keys:

    - top_losses: highest cross-entropy first (the worst mistakes, or label noise)
    - confident_correct: correctly classified, most confident in the predicted class first
    - uncertain: prob closest to 0.5 first
    - false_negatives: label 1 but prob < threshold, highest loss first (missed tumours)
    - random: a seeded random sample, as an unbiased reference

    Ties are broken by id so the sets do not depend on row order. Each frame has a fresh index
    and the columns of `df` (plus loss)."""
    missing = [c for c in ("id", "label", "prob") if c not in df.columns]
    if missing:
        raise DataError(f"Predictions table lacks column(s) {missing}; it has "
                        f"{list(df.columns)}.", fix="it needs id, label and prob columns.")
    k = int(k)
    if k < 0:
        raise DataError(f"k must be non-negative; got {k}.")
    y, p = _as_arrays(df["label"].to_numpy(), df["prob"].to_numpy())
    d = df.copy()
    d["label"], d["prob"] = y, p
    if "loss" not in d.columns:
        d["loss"] = per_patch_losses(y, p)
    pred = (p >= threshold).astype(np.int64)
    correct = pred == y
    confidence = np.where(pred == 1, p, 1.0 - p)
    d["_confidence"] = confidence
    d["_distance"] = np.abs(p - 0.5)

    sets = {
        "top_losses": _top(d, "loss", ascending=False, k=k),
        "confident_correct": _top(d[correct], "_confidence", ascending=False, k=k),
        "uncertain": _top(d, "_distance", ascending=True, k=k),
        "false_negatives": _top(d[(y == 1) & (p < threshold)], "loss", ascending=False, k=k),
        "random": d.sample(n=min(k, len(d)), random_state=seed),
    }
    return {name: s.drop(columns=["_confidence", "_distance"]).reset_index(drop=True)
            for name, s in sets.items()}


def _top(d: pd.DataFrame, key: str, ascending: bool, k: int) -> pd.DataFrame:
    """First k rows by `key`, ties broken by id (stable, deterministic)."""
    return d.sort_values([key, "id"], ascending=[ascending, True], kind="mergesort").head(k)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

def summary(labels, probs, threshold: float = 0.5, n_boot: int = 1000,
            target_sensitivity: float = 0.95, seed: int = 0) -> dict:
    """All headline numbers in one JSON-ready dict (plain int/float/list/None values only).

    Keys: n, n_pos, n_neg, auc, auc_ci [lo, hi], accuracy, threshold, confusion (see
    `confusion_at`), average_precision, ece (10 equal-width bins), brier,
    threshold_for_sensitivity (see `threshold_for_sensitivity`). Undefined rates (NaN) become
    None so that `json.dumps(..., allow_nan=False)` works and the file is valid JSON."""
    y, p = _as_arrays(labels, probs)
    _require_both_classes(y, "The evaluation summary (ROC AUC)")
    confusion = confusion_at(y, p, threshold)
    _, ece = calibration(y, p)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    out = {
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "auc": roc_auc(y, p),
        "auc_ci": [lo, hi],
        "accuracy": confusion["accuracy"],
        "threshold": float(threshold),
        "confusion": confusion,
        "average_precision": average_precision(y, p),
        "ece": ece,
        "brier": brier(y, p),
        "threshold_for_sensitivity": threshold_for_sensitivity(y, p, target_sensitivity),
    }
    return _jsonable(out)


def _jsonable(x):
    """Recursively turn numpy scalars into Python ones and NaN/inf into None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x
