"""Metrics: confusion matrix at a threshold, ROC and PR curves with the operating point, AUC
with its bootstrap CI, calibration; a confusion cell lists its patches. Numbers come from
model.evaluation.metrics."""
from __future__ import annotations

import numpy as np
import streamlit as st

from model.evaluation.metrics import (
    bootstrap_auc_ci,
    calibration,
    confusion_at,
    pr_points,
    roc_auc,
    roc_points,
)
from viewer import components as ui
from viewer import frame

CELLS = {"TP": (1, 1), "FP": (0, 1), "FN": (1, 0), "TN": (0, 0)}


@st.cache_data(max_entries=16, show_spinner="Bootstrapping the AUC confidence interval...")
def _auc_ci(token: tuple, labels: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    lo, hi = bootstrap_auc_ci(labels, probs, n_boot=1000)
    return roc_auc(labels, probs), lo, hi


def render(c) -> None:
    if not ui.need_run(c, "The metrics page"):
        return
    pset = frame.predictions_picker(c, "m")
    if pset is None:
        return
    df = pset.df.dropna(subset=["label"])
    st.caption(f"Predictions: {pset.origin}")
    if df.empty or df["label"].nunique() < 2:
        st.warning("These predictions need both classes (tumour and no tumour) for ROC AUC.")
        return
    y, p = df["label"].to_numpy(int), df["prob"].to_numpy(float)
    thr = st.slider("Threshold (tumour when p ≥ threshold)", 0.0, 1.0, 0.5, 0.01, key="m_thr")
    cm = confusion_at(y, p, thr)
    auc, lo, hi = _auc_ci((pset.origin, len(df), float(p.sum())), y, p)
    cols = st.columns(6)
    cols[0].metric("ROC AUC", f"{auc:.4f}", f"95% CI {lo:.4f}–{hi:.4f}", delta_color="off",
                   delta_arrow="off")
    for col, k in zip(cols[1:], ("sensitivity", "specificity", "precision", "npv", "accuracy")):
        col.metric(k if k != "npv" else "NPV", "–" if np.isnan(cm[k]) else f"{cm[k]:.3f}")
    a, b = st.columns(2)
    a.plotly_chart(ui.confusion_figure(cm), key="m_cm")
    bins, ece = calibration(y, p, 10)
    b.plotly_chart(ui.calibration_figure(bins, ece), key="m_cal")
    a, b = st.columns(2)
    a.plotly_chart(ui.roc_figure({f"AUC {auc:.4f}": roc_points(y, p)},
                                 (cm["fpr"], cm["sensitivity"])), key="m_roc")
    prec = cm["precision"] if not np.isnan(cm["precision"]) else 1.0
    b.plotly_chart(ui.pr_figure(pr_points(y, p), (cm["sensitivity"], prec)), key="m_pr")
    _cell(pset, df, thr, cm)


def _cell(pset, df, thr: float, cm: dict) -> None:
    st.subheader("Patches of one confusion cell")
    cell = st.segmented_control("Cell", list(CELLS), default="FN", key="m_cell",
                                format_func=lambda k: f"{k} ({cm[k.lower()]})") or "FN"
    true, pred = CELLS[cell]
    rows = df[(df["label"] == true) & ((df["prob"] >= thr) == bool(pred))]
    rows = rows.sort_values(["loss", "id"], ascending=[False, True]).head(24)
    st.caption(f"{cell}: true {ui.label_text(true)}, predicted {ui.label_text(pred)} — "
               f"the {len(rows)} with the highest loss.")
    ui.legend()
    frame.patch_rows_grid(pset, rows, "m_grid", n_cols=8, size=128)


if __name__ == "__main__":
    frame.run_page(render, "Metrics")
