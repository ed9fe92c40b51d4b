"""Runs: every run's config and metrics, training curves (loss, accuracy, AUC per epoch, LR
schedule, lr_find), and two runs compared (overlaid ROC, metric table)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from model.core.errors import PcamLensError
from model.evaluation.metrics import roc_points
from model.runs.format import read_config
from model.runs.summary import summarize_run
from viewer import components as ui
from viewer import frame, state

METRIC_KEYS = ["auc", "auc_ci", "accuracy", "average_precision", "ece", "brier", "n",
               "n_pos", "best_epoch"]


def render(c) -> None:
    if not c.runs:
        ui.need_run(c, "This page")
        return
    table = pd.DataFrame([{"name": r.name, "status": r.status, "epochs": r.epochs_text,
                           "auc": r.auc, "arch": r.arch, "data": r.data,
                           "error": r.error or ""} for r in c.runs])
    st.dataframe(table, hide_index=True, column_config={
        "auc": st.column_config.NumberColumn("valid AUC", format="%.4f")})
    names = [r.name for r in c.runs]
    root = Path(c.runs[0].dir).parent
    pick = st.selectbox("Run", names, index=names.index(c.run_name) if c.run_name in names
                        else 0, key="r_pick")
    try:
        _one(root / pick)
    except PcamLensError as e:
        st.error(str(e))
    st.divider()
    st.header("Compare runs")
    if len(names) < 2:
        st.caption("Train a second run to compare.")
        return
    a, b = st.columns(2)
    r1 = a.selectbox("First run", names, index=0, key="r_cmp1")
    r2 = b.selectbox("Second run", names, index=1, key="r_cmp2")
    _compare([root / r1, root / r2])


def _one(run_dir: Path) -> None:
    cfg = read_config(run_dir)
    summary = summarize_run(run_dir)
    if summary.synthetic:
        ui.synthetic_banner("This run's training data")
    m = state.run_metrics(run_dir)
    cols = st.columns(5)
    cols[0].metric("Status", summary.status, f"{summary.epochs_text or '?'} epochs",
                   delta_color="off", delta_arrow="off")
    if m:
        ci = m.get("auc_ci") or [None, None]
        cols[1].metric("Validation AUC", _f(m.get("auc")),
                       f"95% CI {_f(ci[0])}–{_f(ci[1])}", delta_color="off", delta_arrow="off")
        cols[2].metric("Accuracy", _f(m.get("accuracy")))
        cols[3].metric("ECE", _f(m.get("ece")))
        cols[4].metric("Best epoch", str(m.get("best_epoch")))
    else:
        cols[1].caption("No metrics.json yet (written when the run completes).")
    with st.expander("config.json"):
        st.json(cfg, expanded=1)
    if m:
        with st.expander("metrics.json"):
            st.json(m, expanded=1)
    hist = state.run_csv(run_dir, "history.csv")
    if hist is None or hist.empty:
        st.info("No history.csv yet: no epoch has finished.")
    else:
        a, b, d = st.columns(3)
        a.plotly_chart(ui.line_figure(hist, "epoch", ["train_loss", "valid_loss"], "Loss"),
                       key="r_loss")
        b.plotly_chart(ui.line_figure(hist, "epoch", ["accuracy"], "Accuracy"), key="r_acc")
        d.plotly_chart(ui.line_figure(hist, "epoch", ["auc"], "Validation AUC"), key="r_auc")
    a, b = st.columns(2)
    sched = state.run_csv(run_dir, "lr_schedule.csv")
    with a:
        if sched is not None and not sched.empty:
            s = sched.reset_index(names="iteration")
            st.plotly_chart(ui.line_figure(s, "iteration", ["lr"], "LR schedule (per "
                                           "iteration)", ytitle="learning rate"), key="r_sched")
        else:
            st.caption("No lr_schedule.csv.")
    found = state.run_csv(run_dir, "lr_find.csv")
    with b:
        if found is not None and not found.empty:
            st.plotly_chart(ui.line_figure(found, "lr", ["loss"], "lr_find", log_x=True),
                            key="r_lrfind")
        else:
            st.caption("No lr_find.csv (trained with --no-lr-find).")


def _compare(dirs: list[Path]) -> None:
    curves, rows = {}, []
    for d in dirs:
        df = state.run_csv(d, "valid_predictions.csv")
        m = state.run_metrics(d) or {}
        rows.append({"run": d.name, **{k: m.get(k) for k in METRIC_KEYS}})
        if df is not None and df["label"].nunique() == 2:
            curves[f"{d.name} (AUC {_f(m.get('auc'))})"] = roc_points(df["label"], df["prob"])
    table = pd.DataFrame(rows)
    table["auc_ci"] = table["auc_ci"].map(lambda v: f"{_f(v[0])}–{_f(v[1])}"
                                          if isinstance(v, list) else "")
    st.dataframe(table, hide_index=True)
    if curves:
        st.plotly_chart(ui.roc_figure(curves), key="r_cmp_roc")
    else:
        st.caption("Neither run has validation predictions yet.")


def _f(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "–"


if __name__ == "__main__":
    frame.run_page(render, "Runs")
