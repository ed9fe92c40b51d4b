"""Which labels are likely wrong: confident learning (cleanlab) on out-of-fold probabilities.

Only out-of-fold probabilities make sense here: a model that trained on a patch has learnt its
label, right or wrong. cleanlab estimates the joint distribution of given and true labels from
them (confident learning, Northcutt et al. 2021), flags the patches it believes mislabelled
(`find_label_issues`, pruned by the estimated noise rate) and scores every label
(`get_label_quality_scores`, self-confidence: the model's probability of the given label; low
= suspicious). The suggested label is the model's most probable class.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from model.core.errors import PcamLensError


def _cleanlab():
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise PcamLensError("cleanlab is not installed; the label-issue ranking needs it.",
                            fix="pip install -r requirements.txt (it pins cleanlab).") from None
    return find_label_issues, get_label_quality_scores


def label_issues(labels, probs) -> pd.DataFrame:
    """Per patch (in input order): label_quality (0..1, low = likely wrong), suggested_label,
    label_issue (flagged by confident learning) and issue_rank (1 = most likely wrong, over all
    patches, by label quality)."""
    find_label_issues, get_label_quality_scores = _cleanlab()
    y = np.asarray(labels, np.int64)
    p1 = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    pred_probs = np.stack([1.0 - p1, p1], axis=1)
    quality = get_label_quality_scores(y, pred_probs, method="self_confidence")
    flagged = find_label_issues(y, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)
    order = np.lexsort((np.arange(len(y)), quality))  # lowest quality first, ties by position
    rank = np.empty(len(y), np.int64)
    rank[order] = np.arange(1, len(y) + 1)
    return pd.DataFrame({"label_quality": quality, "suggested_label": (p1 >= 0.5).astype(np.int64),
                         "label_issue": np.asarray(flagged, bool), "issue_rank": rank})
