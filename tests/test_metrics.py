"""Tests for model.evaluation.metrics: every number is checked against scikit-learn or a
brute-force / hand-computed reference, on seeded numpy random data and on edge cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from model.core.errors import DataError
from model.evaluation import metrics as m


def make_data(n: int = 500, seed: int = 0, separation: float = 1.0, pos_frac: float = 0.4,
              decimals: int | None = None):
    """Labels and sigmoid scores of two overlapping normals; rounding creates ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_frac).astype(np.int64)
    z = rng.normal(separation * (y - 0.5), 1.0)
    p = 1.0 / (1.0 + np.exp(-z))
    if decimals is not None:
        p = np.round(p, decimals)
    return y, p


# ------------------------------------------------------------------------------------- AUC

@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 2), (2, 1)])
def test_roc_auc_matches_sklearn(seed, decimals):
    y, p = make_data(seed=seed, decimals=decimals)
    assert m.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_perfect_separation_and_reversed():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert m.roc_auc(y, p) == 1.0
    assert m.roc_auc(y, 1.0 - p) == 0.0
    assert m.bootstrap_auc_ci(y, p, n_boot=200) == (1.0, 1.0)


def test_roc_auc_constant_probs_is_half():
    y, _ = make_data(n=300, seed=3)
    p = np.full(len(y), 0.37)
    assert m.roc_auc(y, p) == 0.5
    assert m.bootstrap_auc_ci(y, p, n_boot=100) == (0.5, 0.5)


@pytest.mark.parametrize("fn", [m.roc_auc, m.bootstrap_auc_ci, m.roc_points,
                                m.threshold_for_sensitivity, m.summary])
@pytest.mark.parametrize("label", [0, 1])
def test_one_class_raises_data_error(fn, label):
    y = np.full(20, label)
    p = np.linspace(0.0, 1.0, 20)
    with pytest.raises(DataError, match="both classes"):
        fn(y, p)


def test_pr_metrics_need_a_positive_but_not_a_negative():
    p = np.linspace(0.1, 0.9, 9)
    with pytest.raises(DataError, match="positive"):
        m.average_precision(np.zeros(9), p)
    with pytest.raises(DataError, match="positive"):
        m.pr_points(np.zeros(9), p)
    assert m.average_precision(np.ones(9), p) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("decimals", [None, 1])
def test_resampled_aucs_equal_sklearn_on_explicit_resamples(decimals):
    """The rank-based replicate AUC must equal roc_auc_score on the resampled data, ties too."""
    y, p = make_data(n=120, seed=5, decimals=decimals)
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(7)
    pos_idx = rng.integers(0, len(pos), size=(6, len(pos)))
    neg_idx = rng.integers(0, len(neg), size=(6, len(neg)))
    got = m._resampled_aucs(pos, neg, pos_idx, neg_idx)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    want = [roc_auc_score(labels, np.r_[pos[pi], neg[ni]]) for pi, ni in zip(pos_idx, neg_idx)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.ptp(got) > 0  # the replicates really differ


def test_bootstrap_ci_contains_point_auc_and_is_reproducible():
    y, p = make_data(n=400, seed=8)
    auc = m.roc_auc(y, p)
    lo, hi = m.bootstrap_auc_ci(y, p, n_boot=500, seed=1)
    assert lo < auc < hi
    assert 0.02 < hi - lo < 0.2  # plausible width for 400 samples, not degenerate
    assert m.bootstrap_auc_ci(y, p, n_boot=500, seed=1) == (lo, hi)
    assert m.bootstrap_auc_ci(y, p, n_boot=500, seed=2) != (lo, hi)
    # replicates centre on the point estimate
    assert np.mean(m.bootstrap_aucs(y, p, n_boot=500, seed=1)) == pytest.approx(auc, abs=0.01)


def test_bootstrap_spread_matches_delong_standard_error():
    """Resampling both classes gives the DeLong variance var(V10)/n_pos + var(V01)/n_neg
    (V10, V01: each patch's share of correctly ordered pairs). Resampling only one class,
    or neither, would give a clearly smaller spread."""
    y, p = make_data(n=400, seed=21)
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    se = math.sqrt(psi.mean(axis=1).var() / len(pos) + psi.mean(axis=0).var() / len(neg))
    boot_sd = m.bootstrap_aucs(y, p, n_boot=1000, seed=0).std()
    assert boot_sd == pytest.approx(se, rel=0.12)


def test_bootstrap_ci_narrows_with_more_data_and_higher_alpha():
    small = m.bootstrap_auc_ci(*make_data(n=200, seed=9), n_boot=300)
    large = m.bootstrap_auc_ci(*make_data(n=20_000, seed=9), n_boot=300)
    assert (large[1] - large[0]) < 0.3 * (small[1] - small[0])
    y, p = make_data(n=400, seed=10)
    lo95, hi95 = m.bootstrap_auc_ci(y, p, n_boot=400, alpha=0.05)
    lo50, hi50 = m.bootstrap_auc_ci(y, p, n_boot=400, alpha=0.5)
    assert lo95 < lo50 < hi50 < hi95


def test_bootstrap_is_stratified_with_a_single_positive():
    """With one positive an unstratified bootstrap would often draw no positive at all."""
    y = np.array([1] + [0] * 50)
    p = np.r_[0.6, np.linspace(0.0, 1.0, 50)]
    aucs = m.bootstrap_aucs(y, p, n_boot=200)
    assert np.all(np.isfinite(aucs)) and np.all((aucs >= 0) & (aucs <= 1))


def test_bootstrap_replicates_do_not_depend_on_chunking_or_n_boot(monkeypatch):
    y, p = make_data(n=300, seed=11)
    whole = m.bootstrap_aucs(y, p, n_boot=50, seed=3)
    np.testing.assert_array_equal(m.bootstrap_aucs(y, p, n_boot=20, seed=3), whole[:20])
    monkeypatch.setattr(m, "_BOOT_CHUNK_ELEMENTS", 7 * 300)  # chunks of 7 replicates
    np.testing.assert_array_equal(m.bootstrap_aucs(y, p, n_boot=50, seed=3), whole)


def test_calibration_bin_edges():
    """Right-closed bins like sklearn: an edge value belongs to the bin below; 0 to the first."""
    bins, _ = m.calibration([0, 0, 1, 1, 1], [0.0, 0.1, 0.1000001, 0.5, 1.0], n_bins=10)
    assert bins["count"].tolist() == [2, 1, 0, 0, 1, 0, 0, 0, 0, 1]


def test_bootstrap_rejects_bad_parameters():
    y, p = make_data(n=50)
    with pytest.raises(DataError):
        m.bootstrap_auc_ci(y, p, n_boot=0)
    with pytest.raises(DataError):
        m.bootstrap_auc_ci(y, p, alpha=1.5)


# ------------------------------------------------------------------------------- confusion

@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.73])
def test_confusion_at_matches_sklearn(threshold):
    y, p = make_data(n=600, seed=12, decimals=2)
    c = m.confusion_at(y, p, threshold)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (c["tn"], c["fp"], c["fn"], c["tp"]) == (tn, fp, fn, tp)
    assert c["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert c["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert c["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert c["precision"] == pytest.approx(precision_score(y, pred))
    assert c["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert c["f1"] == pytest.approx(f1_score(y, pred))
    assert c["threshold"] == threshold


def test_confusion_at_threshold_is_inclusive_and_undefined_rates_are_nan():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.5, 0.5, 0.2, 0.1])
    c = m.confusion_at(y, p, 0.5)  # prob == threshold counts as positive
    assert (c["tn"], c["fp"], c["fn"], c["tp"]) == (1, 1, 1, 1)
    nothing = m.confusion_at(y, p, 0.9)
    assert nothing["tp"] == nothing["fp"] == 0
    assert math.isnan(nothing["precision"])
    assert nothing["f1"] == 0.0 and nothing["specificity"] == 1.0


# ---------------------------------------------------------------------------------- curves

def test_roc_points_match_sklearn_and_are_finite():
    y, p = make_data(n=500, seed=13, decimals=2)
    df = m.roc_points(y, p)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=True)
    assert list(df.columns) == ["fpr", "tpr", "threshold"]
    np.testing.assert_array_equal(df["fpr"], fpr)
    np.testing.assert_array_equal(df["tpr"], tpr)
    assert np.isinf(thr[0]) and df["threshold"].iloc[0] == 1.0
    np.testing.assert_array_equal(df["threshold"].iloc[1:], thr[1:])
    assert np.all(np.isfinite(df.to_numpy()))
    area = np.sum(np.diff(df["fpr"]) * (df["tpr"].iloc[1:].to_numpy()
                                        + df["tpr"].iloc[:-1].to_numpy()) / 2)
    assert area == pytest.approx(m.roc_auc(y, p), abs=1e-12)
    json.dumps(df.to_dict(orient="list"), allow_nan=False)


def test_pr_points_and_average_precision_match_sklearn():
    y, p = make_data(n=500, seed=14, decimals=2)
    df = m.pr_points(y, p)
    precision, recall, thr = precision_recall_curve(y, p)
    assert list(df.columns) == ["recall", "precision", "threshold"]
    np.testing.assert_array_equal(df["recall"], recall[::-1])
    np.testing.assert_array_equal(df["precision"], precision[::-1])
    np.testing.assert_array_equal(df["threshold"].iloc[1:], thr[::-1])
    assert df.iloc[0].tolist() == [0.0, 1.0, 1.0]
    assert np.all(np.diff(df["recall"]) >= 0)
    assert m.average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


# ----------------------------------------------------------------- threshold for sensitivity

def brute_force_threshold(y, p, target):
    """Highest candidate threshold (any prob value) whose sensitivity reaches target."""
    for t in np.unique(p)[::-1]:
        if np.mean(p[y == 1] >= t) >= target:
            return t
    raise AssertionError("unreachable: the lowest prob gives sensitivity 1")


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("decimals", [None, 1])
def test_threshold_for_sensitivity(target, decimals):
    y, p = make_data(n=400, seed=15, decimals=decimals)
    r = m.threshold_for_sensitivity(y, p, target)
    t = r["threshold"]
    assert t == brute_force_threshold(y, p, target)
    c = m.confusion_at(y, p, t)
    assert r["sensitivity"] == c["sensitivity"] >= target
    assert r["specificity"] == c["specificity"]
    assert (r["tp"], r["fp"]) == (c["tp"], c["fp"])
    # highest: any higher threshold misses the target
    assert m.confusion_at(y, p, np.nextafter(t, np.inf))["sensitivity"] < target


def test_threshold_for_sensitivity_float_rounding():
    """0.28 * 25 is 7.000000000000001 in floats, yet 7 of 25 positives already reach 0.28:
    a plain ceil() would ask for 8 and return a needlessly low threshold."""
    assert 0.28 * 25 > 7 and 7 / 25 >= 0.28
    y = np.r_[np.ones(25, dtype=int), np.zeros(10, dtype=int)]
    p = np.r_[np.linspace(0.99, 0.4, 25), np.full(10, 0.1)]
    r = m.threshold_for_sensitivity(y, p, 0.28)
    assert r["sensitivity"] == 7 / 25 and r["threshold"] == p[6]


# ----------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_calibration_matches_sklearn_calibration_curve(n_bins):
    y, p = make_data(n=800, seed=16, decimals=2)  # includes values sitting on bin edges
    p[:3] = [0.0, 1.0, 0.3]
    bins, ece = m.calibration(y, p, n_bins=n_bins)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    filled = bins[bins["count"] > 0]
    np.testing.assert_allclose(filled["frac_pos"], prob_true, atol=1e-12)
    np.testing.assert_allclose(filled["mean_prob"], prob_pred, atol=1e-12)
    assert len(bins) == n_bins and bins["count"].sum() == len(y)
    np.testing.assert_allclose(bins["bin_lo"], np.linspace(0, 1, n_bins + 1)[:-1])
    np.testing.assert_allclose(bins["bin_hi"], np.linspace(0, 1, n_bins + 1)[1:])
    assert bins.loc[bins["count"] == 0, "mean_prob"].isna().all()
    # ECE from an independent per-sample formula: |frac_pos - mean_prob| of each sample's bin
    idx = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p, side="left")
    gap = np.abs(bins["frac_pos"].to_numpy() - bins["mean_prob"].to_numpy())
    assert ece == pytest.approx(np.mean(gap[idx]), abs=1e-12)


def test_ece_is_zero_for_perfectly_calibrated_bins():
    # bin (0.2, 0.3]: four patches at 0.25, one positive; (0.7, 0.8]: four at 0.75, three
    # positive; (0.4, 0.5]: two at 0.5, one positive. Every bin's frequency equals its prob.
    p = np.r_[[0.25] * 4, [0.75] * 4, [0.5] * 2]
    y = np.r_[[1, 0, 0, 0], [1, 1, 1, 0], [1, 0]]
    bins, ece = m.calibration(y, p, n_bins=10)
    assert ece == pytest.approx(0.0, abs=1e-15)
    assert bins["count"].tolist() == [0, 0, 4, 0, 2, 0, 0, 4, 0, 0]


def test_ece_of_overconfident_predictions():
    p = np.full(10, 0.9)
    y = np.r_[np.ones(6, dtype=int), np.zeros(4, dtype=int)]
    assert m.calibration(y, p)[1] == pytest.approx(0.3)


def test_brier_matches_sklearn():
    y, p = make_data(n=500, seed=17)
    assert m.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert m.brier([0, 1], [0.0, 1.0]) == 0.0


def test_per_patch_losses():
    y, p = make_data(n=500, seed=18)
    losses = m.per_patch_losses(y, p)
    assert losses.shape == (500,)
    assert np.mean(losses) == pytest.approx(log_loss(y, p), rel=1e-9)
    np.testing.assert_allclose(losses[y == 1], -np.log(p[y == 1]))
    # confident mistakes are large but finite; confident hits are ~0
    extreme = m.per_patch_losses([1, 0, 1, 0], [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(extreme[:2], -np.log(1e-7), rtol=1e-6)
    assert np.all(extreme[2:] < 1e-6)


# ----------------------------------------------------------------------------- sample sets

def make_predictions_df(n=200, seed=19):
    y, p = make_data(n=n, seed=seed, decimals=3)
    return pd.DataFrame({"id": [f"p{i:04d}" for i in range(n)], "label": y, "prob": p})


def test_sample_sets_contents_and_order():
    df = make_predictions_df()
    sets = m.sample_sets(df, k=10, seed=0)
    assert set(sets) == {"top_losses", "confident_correct", "uncertain", "false_negatives",
                         "random"}
    loss = m.per_patch_losses(df["label"], df["prob"])

    top = sets["top_losses"]
    assert len(top) == 10 and top["loss"].is_monotonic_decreasing
    assert top["loss"].min() >= np.sort(loss)[-10]

    cc = sets["confident_correct"]
    assert ((cc["prob"] >= 0.5).astype(int) == cc["label"]).all()
    conf = np.maximum(cc["prob"], 1 - cc["prob"])
    assert conf.is_monotonic_decreasing
    correct = (df["prob"] >= 0.5).astype(int) == df["label"]
    all_conf = np.maximum(df["prob"], 1 - df["prob"])[correct]
    assert conf.min() >= np.sort(all_conf)[-10]

    unc = np.abs(sets["uncertain"]["prob"] - 0.5)
    assert unc.is_monotonic_increasing
    assert unc.max() <= np.sort(np.abs(df["prob"] - 0.5))[9]

    fneg = sets["false_negatives"]
    assert len(fneg) > 0
    assert (fneg["label"] == 1).all() and (fneg["prob"] < 0.5).all()
    assert fneg["loss"].is_monotonic_decreasing
    n_fn = int(((df["label"] == 1) & (df["prob"] < 0.5)).sum())
    assert len(fneg) == min(10, n_fn)


def test_sample_sets_random_is_seeded_and_from_df():
    df = make_predictions_df()
    a = m.sample_sets(df, k=12, seed=4)["random"]
    b = m.sample_sets(df, k=12, seed=4)["random"]
    c = m.sample_sets(df, k=12, seed=5)["random"]
    pd.testing.assert_frame_equal(a, b)
    assert a["id"].tolist() != c["id"].tolist()
    assert len(a) == 12 and a["id"].is_unique and set(a["id"]) <= set(df["id"])


def test_sample_sets_uses_given_loss_and_small_frames():
    df = make_predictions_df(n=5)
    df["loss"] = [5.0, 1.0, 3.0, 4.0, 2.0]
    sets = m.sample_sets(df, k=16)
    assert sets["top_losses"]["loss"].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert all(len(s) <= 5 for s in sets.values())
    with pytest.raises(DataError, match="prob"):
        m.sample_sets(df.drop(columns=["prob"]))


# --------------------------------------------------------------------------------- summary

def test_summary_values_and_json():
    y, p = make_data(n=600, seed=20)
    s = m.summary(y, p, threshold=0.4, n_boot=200, target_sensitivity=0.9, seed=3)
    text = json.dumps(s, allow_nan=False)  # valid JSON, no numpy types, no NaN
    assert json.loads(text) == s
    assert (s["n"], s["n_pos"], s["n_neg"]) == (600, int(y.sum()), int(600 - y.sum()))
    assert s["auc"] == pytest.approx(roc_auc_score(y, p))
    assert s["auc_ci"] == list(m.bootstrap_auc_ci(y, p, n_boot=200, seed=3))
    assert s["auc_ci"][0] < s["auc"] < s["auc_ci"][1]
    assert s["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.4))
    assert s["threshold"] == 0.4
    assert s["confusion"] == m.confusion_at(y, p, 0.4)
    assert s["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert s["ece"] == pytest.approx(m.calibration(y, p)[1])
    assert s["brier"] == pytest.approx(brier_score_loss(y, p))
    assert s["threshold_for_sensitivity"] == m.threshold_for_sensitivity(y, p, 0.9)
    assert type(s["n"]) is int and type(s["auc"]) is float
    assert type(s["confusion"]["tp"]) is int


def test_summary_turns_undefined_rates_into_none():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.6, 0.3, 0.8])
    s = m.summary(y, p, threshold=0.95, n_boot=20)
    assert s["confusion"]["precision"] is None
    json.dumps(s, allow_nan=False)


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("labels,probs,match", [
    ([0, 1, 1], [0.1, 0.2], "must match"),
    ([], [], "empty"),
    ([0, 2, 1], [0.1, 0.2, 0.3], "0 or 1"),
    ([0, 1, 1], [0.1, 1.2, 0.3], r"\[0, 1\]"),
    ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
    ([0, 1], [[0.9, 0.1], [0.2, 0.8]], "1-D"),
    ([0, 1], ["a", "b"], "not numbers"),
])
def test_bad_input_raises_data_error(labels, probs, match):
    with pytest.raises(DataError, match=match):
        m.confusion_at(labels, probs)


def test_bool_and_float_labels_are_accepted():
    p = np.array([0.2, 0.7, 0.4, 0.9])
    want = m.roc_auc(np.array([0, 1, 0, 1]), p)
    assert m.roc_auc(np.array([False, True, False, True]), p) == want
    assert m.roc_auc(np.array([0.0, 1.0, 0.0, 1.0]), p) == want
