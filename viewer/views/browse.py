"""Browse: a paged grid of patches with filters; a patch opens a detail view (large patch,
Grad-CAM, augmentation preview, review history). Only the shown page's patches are read."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from model.nets.transforms import AugmentConfig, augmentation_views
from model.runs.format import read_config
from model.runs.summary import training_augmentation
from viewer import components as ui
from viewer import frame, preds, state

LABELS = {"tumour": 1, "no tumour": 0}
SORTS = {"loss (highest first)": ("loss", False), "probability (highest first)": ("prob", False),
         "probability (lowest first)": ("prob", True), "id": ("id", True),
         "source order": (None, True),
         # out-of-fold predictions only (model.crossval)
         "label quality (lowest first)": ("label_quality", True),
         "TTA spread (highest first)": ("tta_spread", False)}


def _filters(c, t: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    has_pred = t["prob"].notna().any()
    with st.expander("Filters and sort", expanded=True, icon=":material/filter_alt:"):
        a, b, d, e = st.columns(4)
        lab = a.multiselect("Label", ["tumour", "no tumour", "unlabelled"], key="b_label")
        pred = b.multiselect("Predicted", ["tumour", "no tumour", "no prediction"], key="b_pred",
                             disabled=not has_pred)
        corr = d.segmented_control("Prediction", ["all", "correct", "incorrect"], key="b_corr",
                                   default="all", disabled=not has_pred) or "all"
        lo, hi = e.slider("Probability range", 0.0, 1.0, (0.0, 1.0), 0.01, key="b_prob",
                          disabled=not has_pred)
        a, b, d, e = st.columns(4)
        rev = a.selectbox("Review status", ["all", "not reviewed", "reviewed", "flagged",
                                            "relabelled"], key="b_rev")
        out = b.selectbox("Outliers", ["all", "near-black", "near-white", "any outlier"],
                          key="b_out")
        sorts = [k for k, (col, _) in SORTS.items() if col is None or col in t.columns]
        sort = d.selectbox("Sort by", sorts, key="b_sort", index=0 if has_pred else 4)
        size = e.selectbox("Per page", [24, 48, 96], index=1, key="b_size")
    log = state.review_log(c.source) if rev != "all" else None
    rep = _outlier_report(c) if out != "all" else None
    key = (tuple(lab), tuple(pred), corr, lo, hi, rev, out, sort,
           log.stats()["n_decisions"] if log else None, rep is not None)
    memo = preds._memo(("browse-filter", c.src_key), dict)
    hit = memo.get(key)
    if hit is None or hit[0] is not t:  # filter + sort 220k rows once, not on every rerun
        if len(memo) > 8:
            memo.clear()
        memo[key] = hit = (t, _apply(t, lab, pred, corr, lo, hi, rev, log, out, rep, sort))
    return hit[1], size


def _apply(t, lab, pred, corr, lo, hi, rev, log, out, rep, sort) -> pd.DataFrame:
    m = np.ones(len(t), bool)
    if lab:
        keep = [LABELS.get(v, -1) for v in lab]
        m &= t["label"].isin(keep).to_numpy() | (("unlabelled" in lab)
                                                 & t["label"].isna().to_numpy())
    if pred:
        keep = [LABELS.get(v, -1) for v in pred]
        m &= t["pred"].isin(keep).to_numpy() | (("no prediction" in pred)
                                                & t["prob"].isna().to_numpy())
    if corr != "all":
        m &= (t["correct"] == (corr == "correct")).to_numpy() & t["correct"].notna().to_numpy()
    if (lo, hi) != (0.0, 1.0):
        m &= t["prob"].between(lo, hi).to_numpy()
    if rev in ("not reviewed", "reviewed"):
        inn = t["id"].isin(log.reviewed_ids()).to_numpy()
        m &= inn if rev == "reviewed" else ~inn
    elif rev != "all":
        latest = log.latest()
        act = "flag" if rev == "flagged" else "relabel"
        m &= t["id"].isin(set(latest.loc[latest["action"] == act, "patch_id"])).to_numpy()
    if rep is not None:
        keys = {"near-black": ["near_black"], "near-white": ["near_white"],
                "any outlier": ["near_black", "near_white"]}[out]
        o = np.zeros(len(t), bool)
        o[[f["index"] for k in keys for f in rep[k]]] = True
        m &= o
    key, asc = SORTS[sort]
    r = t[m]
    if key is not None:
        r = r.sort_values([key, "id"] if key != "id" else "id", ascending=asc, kind="mergesort",
                          na_position="last")
    return r


def _outlier_report(c) -> dict | None:
    rep = state.inspect_report(c.src_key)
    if rep is None:
        st.info("The outlier filter needs the dataset checks, which decode every patch.")
        if not st.button("Run the dataset checks now", key="b_scan"):
            return None
        n = len(c.source)
        with st.spinner(f"Checking {'a sample of 3,000' if n > 3000 else n} patches..."):
            rep = state.run_inspect(c.src_key, 3000 if n > 3000 else None)
    if rep.get("sampled"):
        st.caption(f"Outliers found in a sample of {rep['n_inspected']:,} patches.")
    return rep


def _turn(step: int) -> None:
    st.session_state["b_page"] = st.session_state.get("b_page", 1) + step


def _page_nav(n: int, size: int) -> int:
    pages = max(1, math.ceil(n / size))
    ss = st.session_state
    ss["b_page"] = min(max(1, ss.get("b_page", 1)), pages)
    a, b, d, e = st.columns([1.6, 1.6, 2, 5], vertical_alignment="bottom")
    a.button("Previous", key="b_prev", icon=":material/chevron_left:", on_click=_turn,
             args=(-1,), disabled=ss["b_page"] <= 1, shortcut="Left")
    b.button("Next", key="b_next", icon=":material/chevron_right:", on_click=_turn, args=(1,),
             disabled=ss["b_page"] >= pages, shortcut="Right")
    d.number_input(f"Page (of {pages:,})", 1, pages, key="b_page")
    e.caption(f"{n:,} patch matches" if n == 1 else f"{n:,} patches match")
    return ss["b_page"]


def render(c) -> None:
    if not ui.need_source(c):
        return
    t, pset = preds.patch_table(c)
    _prediction_note(c, t, pset)
    rows, size = _filters(c, t)
    page = _page_nav(len(rows), size)
    top = st.columns([2, 3, 2, 5], vertical_alignment="center")
    box = top[0].toggle("Centre box", value=True, key="b_box")
    live = top[1].toggle("Predict the shown page", key="b_live", disabled=c.run_key is None,
                         help="Runs the model on the patches of this page only (cached).")
    zoom = top[2].selectbox("Zoom", [96, 144, 192, 288], index=2, key="b_zoom",
                            format_func=lambda v: f"{v} px", label_visibility="collapsed")
    ui.legend()
    part = rows.iloc[(page - 1) * size: page * size]
    if part.empty:
        st.info("No patch matches these filters.")
        return
    idx = part.index.to_numpy()
    pix = c.source.read_batch(idx)
    probs = part["prob"].to_numpy(float)
    if live and c.run_key is not None and np.isnan(probs).any():
        fresh = preds.page_probs(c.run_key, c.src_key, tuple(int(i) for i in idx))
        probs = np.where(np.isnan(probs), fresh, probs)
    imgs = [ui.patch_image(x, lab, 96, box) for x, lab in zip(pix, part["label"])]
    caps = [ui.caption(pid, lab, p) for pid, lab, p in zip(part["id"], part["label"], probs)]
    clicked = ui.grid(imgs, caps, buttons=list(part["id"]), key="b_grid", width=zoom)
    if clicked:
        detail(c, clicked)


def _prediction_note(c, t, pset) -> None:
    if c.run_key is None and not (pset is not None and pset.out_of_fold):
        st.caption("No run selected: probabilities are not shown.")
        return
    n = int(t["prob"].notna().sum())
    if pset is not None and n:
        st.caption(f"Predictions: {pset.origin}. Filters and sorting on predictions cover "
                   f"the {n:,} patches that have one."
                   + (f" Note: {pset.warning}" if pset.warning else ""))
    else:
        st.caption("No stored predictions for this source: switch on “Predict the shown "
                   "page”, or predict the whole source for filters and sorting on them.")
    if not (pset is not None and pset.whole_source) and c.run_key is not None:
        label = f"Predict all {len(c.source):,} patches"
        if st.button(label, key="b_predict_all", icon=":material/play_arrow:",
                     help="Runs the model on every patch (slow for big sources on a CPU; "
                          "any click elsewhere stops it). Labelled data is evaluated with "
                          "model.evaluate, whose files in <run>/eval/ are reused later."):
            frame.predict_with_progress(c)
            st.rerun()


@st.dialog("Patch", width="large")
def detail(c, pid: str) -> None:
    frame.guarded(_detail, c, pid)


def _detail(c, pid: str) -> None:
    src = c.source
    i = src.index_of(pid)
    x = src.read(i)
    label = None if src.labels is None else int(src.labels[i])
    t, _ = preds.patch_table(c)
    row = t.loc[i]
    prob = row["prob"] if not pd.isna(row["prob"]) else (
        float(preds.page_probs(c.run_key, c.src_key, (int(i),))[0]) if c.run_key else None)
    st.markdown(f"**{pid}** · label **{ui.label_text(label)}**"
                + (f" · p(tumour) **{prob:.3f}**" if prob is not None else "")
                + (f" · loss {row['loss']:.3f}" if not pd.isna(row["loss"]) else ""))
    path = src.path_of(i)
    st.caption(f"Row {i} of {src.describe_short()}" + (f" · file {path}" if path else ""))
    ui.queue_reason(row, x)
    mask = src.mask(i) if hasattr(src, "mask") else None
    a, b = st.columns(2)
    a.image(ui.patch_image(x, label, 384, mask=mask),
            caption="Patch (box: labelled centre" + (", white: true tumour pixels" if mask
                                                     is not None and mask.any() else "") + ")")
    with b:
        if c.run_key is not None:
            layers = preds.gradcam_layer_names(c.run_key)
            layer = st.selectbox("Grad-CAM layer", layers, key="d_layer",
                                 format_func=lambda n: f"{n} (default)" if n == layers[0]
                                 else n)
            alpha = st.slider("Opacity", 0.0, 1.0, 0.45, key="d_alpha")
            heat = preds.gradcam_heat(c.run_key, c.src_key, pid, layer, None)
            st.image(ui.patch_image(preds.overlay(x, heat, alpha), label, 384),
                     caption="Grad-CAM for the predicted class")
        else:
            st.info("Select a run to see Grad-CAM.")
    augs, note = _augmentations(c, x, st.session_state.get("d_seed", 0))
    st.markdown(f"**Augmentation preview** ({note})")
    st.image([ui.patch_image(v, label, 96) for v in augs], width=144)
    if st.button("New random augmentations", key="d_reseed"):
        st.session_state["d_seed"] = st.session_state.get("d_seed", 0) + 1
        st.rerun(scope="fragment")
    emb = preds.embeddings(c)
    if emb is not None:
        st.markdown("**Most similar patches** (cosine of the run's embeddings; relabel "
                    "look-alikes together on the Review page)")
        frame.similar_grid(c, emb, i, "d_similar", k=8)
    elif c.run_key is not None:
        st.caption("Similar patches: compute the run's embeddings on the Map page.")
    st.markdown("**Review history**")
    hist = state.review_log(src).history(pid)
    if hist.empty:
        st.caption("Not reviewed yet.")
    else:
        st.dataframe(hist.drop(columns=["patch_id"]), hide_index=True)


def _augmentations(c, x: np.ndarray, seed: int, n: int = 6) -> tuple[list[np.ndarray], str]:
    """n random training augmentations with the run's settings (model.nets.transforms)."""
    cfg, note = AugmentConfig(), "random training augmentations, default settings"
    if c.run_dir is not None:
        trained = training_augmentation(read_config(c.run_dir))
        if trained is None:
            note = f"run {c.run_name} trained without augmentation; default settings shown"
        else:
            cfg, note = trained, f"random training augmentations as in run {c.run_name}"
    return augmentation_views(x, cfg, n, seed), note


if __name__ == "__main__":
    frame.run_page(render, "Browse patches")
