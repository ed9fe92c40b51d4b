"""Dataset: class balance, channel statistics, problems and outlier galleries of the chosen
source (model.inspect). Small sources are checked at once, big ones on demand or sampled."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from model.data.inspect import InspectReport
from viewer import components as ui
from viewer import frame, state

AUTO_MAX = 6_000  # sources up to this size are checked without asking


def render(c) -> None:
    if not ui.need_source(c):
        return
    src = c.source
    n = len(src)
    a, b, d, e = st.columns(4)
    a.metric("Patches", f"{n:,}")
    b.metric("Kind", src.kind)
    d.metric("Split", src.split or "all")
    e.metric("Labelled", "yes" if src.labelled else "no")
    _balance(src)
    rep = state.inspect_report(c.src_key)
    if rep is None:
        sample = None if n <= AUTO_MAX else 3000
        if n <= AUTO_MAX or _ask(n):
            with st.spinner(f"Checking {n if sample is None else sample:,} patches "
                            "(decoding every one)..."):
                rep = state.run_inspect(c.src_key, sample)
            if n > AUTO_MAX:
                st.rerun()
        else:
            return
    _report(c, rep)
    _duplicates(c)


def _duplicates(c) -> None:
    """Exact duplicates (also flipped/rotated) and, with a run, near-duplicates in its
    embeddings and the pairs its split separates (model.evaluation.duplicates)."""
    st.subheader("Duplicates and leakage")
    rep = state.duplicates_report(c.src_key, c.run_key)
    if rep is None:
        with_run = f" and near-duplicates in run {c.run_name}'s embeddings" if c.run_key else ""
        st.caption(f"Exact duplicates (flips and rotations included), copies between train "
                   f"and test{with_run}; also `python -m model.inspect DATA --duplicates "
                   "--run RUN`.")
        if not st.button("Find duplicates", key="ds_dups", icon=":material/content_copy:"):
            return
        with st.spinner(f"Comparing {len(c.source):,} patches..."):
            rep = state.run_duplicates(c)
    st.text(rep.format())
    near = rep.near[~rep.near["background"]] if len(rep.near) else rep.near
    pairs = [g[:2] for g in rep.exact[:4]] + [[r.id_a, r.id_b] for r in near.head(4)
                                              .itertuples()]
    if pairs:
        st.caption("Examples (exact duplicates first, then near-duplicates):")
        ids = [i for pair in pairs for i in pair]
        idx = [c.source.index_of(i) for i in ids]
        labels = [None if c.source.labels is None else int(c.source.labels[i]) for i in idx]
        ui.grid([ui.patch_image(x, lab, 96) for x, lab in zip(c.source.read_batch(idx),
                                                              labels)],
                [ui.caption(i, lab) for i, lab in zip(ids, labels)], 8, key="ds_dup_grid",
                width=128)


def _ask(n: int) -> bool:
    st.info(f"The checks decode every patch; for {n:,} patches that takes a while. "
            "A random sample of 3,000 gives the statistics quickly (problems in the rest "
            "are then not listed).")
    return st.button("Check a sample of 3,000 patches", key="ds_scan", type="primary")


def _balance(src) -> None:
    import plotly.express as px

    if src.labels is None:
        st.caption("Unlabelled source: no class balance.")
        return
    counts = pd.Series(src.labels).value_counts().reindex(range(len(src.classes)), fill_value=0)
    d = pd.DataFrame({"class": src.classes, "patches": counts.to_numpy()})
    d["share"] = d["patches"] / max(1, d["patches"].sum())
    fig = px.bar(d, x="class", y="patches", text=d["share"].map("{:.1%}".format),
                 color="class", color_discrete_map={"tumour": "#e62828",
                                                    "no tumour": "#1ebe46"})
    fig.update_layout(showlegend=False)
    st.plotly_chart(ui.fig_layout(fig, "Class balance", 300), key="ds_balance")


def _report(c, rep: dict) -> None:
    import plotly.graph_objects as go

    if rep.get("sampled"):
        st.caption(f"Statistics from a random sample of {rep['n_inspected']:,} of "
                   f"{rep['n_total']:,} patches.")
    if rep.get("channel_mean"):
        fig = go.Figure(go.Bar(x=["R", "G", "B"], y=rep["channel_mean"],
                               error_y=dict(type="data", array=rep["channel_std"]),
                               marker_color=["#d62728", "#2ca02c", "#1f77b4"]))
        fig.update_yaxes(title="mean ± std (0-1 scale)", range=[0, 1])
        st.plotly_chart(ui.fig_layout(fig, "Channel statistics", 300), key="ds_channels")
        st.caption("Mean " + ", ".join(f"{v:.3f}" for v in rep["channel_mean"]) + " · std "
                   + ", ".join(f"{v:.3f}" for v in rep["channel_std"])
                   + " (RGB; these are the dataset normalisation statistics)")

    st.subheader("Checks")
    table = InspectReport.from_dict(rep).table()
    st.dataframe(table, hide_index=True, height=35 * (len(table) + 1) + 3)
    for key, title in (("near_black", "Near-black patches (every pixel below 10)"),
                       ("near_white", "Near-white patches (every pixel above 245)")):
        found = rep.get(key, [])
        st.subheader(f"{title}: {len(found)}")
        if found:
            if len(found) > 24:
                st.caption(f"The first 24 of {len(found)}.")
            _gallery(c, found[:24], key)
    if rep.get("unreadable"):
        st.subheader("Unreadable")
        st.dataframe(pd.DataFrame(rep["unreadable"]), hide_index=True)


def _gallery(c, found: list[dict], key: str) -> None:
    idx = [f["index"] for f in found]
    pix = c.source.read_batch(idx)
    labels = [None if c.source.labels is None else int(c.source.labels[i]) for i in idx]
    ui.grid([ui.patch_image(x, lab, 96) for x, lab in zip(pix, labels)],
            [ui.caption(f["id"], lab) for f, lab in zip(found, labels)], 8, key=key, width=128)


if __name__ == "__main__":
    frame.run_page(render, "Dataset")
