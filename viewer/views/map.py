"""Map: every patch of the source on a 2-D map of the run's embeddings (UMAP or PCA, from
model.evaluation.embeddings), coloured by label, prediction, error, probability, loss, label
quality, review status or split; a box or lasso selection fills a grid of its patches, and a
patch shows its most similar ones."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from model.evaluation import embeddings
from model.runs.format import read_config
from model.runs.summary import belongs_to
from viewer import components as ui
from viewer import frame, jobs, preds, scatter, state

COLOURS = ["label", "prediction", "correct / incorrect", "probability", "loss",
           "label quality", "review status", "data split"]
CATEGORY_COLOURS = {"tumour": "#d62728", "no tumour": "#2ca02c", "unlabelled": "#bcbd22",
                    "correct": "#1f77b4", "incorrect": "#ff7f0e", "no prediction": "#7f7f7f",
                    "reviewed": "#9467bd", "not reviewed": "#c7c7c7", "relabelled": "#e377c2",
                    "flagged": "#8c564b", "train": "#17becf", "validation": "#ff7f0e",
                    "other": "#c7c7c7"}
GRID_MAX = 48


def _categories(c, t: pd.DataFrame, by: str) -> pd.Series | None:
    """A category per row for the categorical colourings; None for the continuous ones."""
    def names(values, mapping):
        return pd.Series(values).map(mapping).fillna("unlabelled")

    if by == "label":
        return names(t["label"], {1: "tumour", 0: "no tumour"})
    if by == "prediction":
        return names(t["pred"], {1: "tumour", 0: "no tumour"}).replace(
            "unlabelled", "no prediction")
    if by == "correct / incorrect":
        return pd.Series(np.where(t["correct"].isna(), "no prediction",
                                  np.where(t["correct"] == True, "correct", "incorrect")))  # noqa: E712
    if by == "review status":
        latest = state.review_log(c.source).latest()
        act = dict(zip(latest["patch_id"], latest["action"]))
        return pd.Series([{"relabel": "relabelled", "flag": "flagged"}.get(act.get(i),
                          "reviewed" if i in act else "not reviewed") for i in t["id"]])
    if by == "data split":
        side = {}
        cfg = read_config(c.run_dir)
        if belongs_to(cfg, c.source):
            for name, what in (("train_ids.csv", "train"), ("valid_ids.csv", "validation")):
                df = state.run_csv(c.run_dir, name)
                if df is not None:
                    side.update({i: what for i in df["id"].astype(str)})
        return pd.Series([side.get(i, "other") for i in t["id"]])
    return None


@st.cache_data(max_entries=4, show_spinner=False)
def _points_image(xy: np.ndarray, rgb: np.ndarray, box: tuple) -> Image.Image:
    return scatter.raster(xy, rgb, box)


def _figure(xy: np.ndarray, t: pd.DataFrame, cat: pd.Series | None, by: str) -> go.Figure:
    """Scattergl markers of every point, or above scatter.POINTS_MAX: every point in an image
    under a sample of markers (hover and selection; the page maps a box or lasso to rows)."""
    fig = go.Figure()
    # customdata = the row only: 220k ids and formatted numbers as strings would triple what
    # the browser receives; the hover shows the row, the selection grid shows the ids
    hover = "row %{customdata}<extra></extra>"
    rows = scatter.sample_rows(cat, len(xy))
    big = len(rows) < len(xy)
    if cat is not None:
        codes, names = pd.factorize(cat)
        rgb = np.array([scatter.hex_rgb(CATEGORY_COLOURS.get(n, "#7f7f7f")) for n in names],
                       np.uint8)[codes]
        for name in sorted(cat.unique()):
            m = rows[(cat.to_numpy()[rows] == name)]
            fig.add_trace(go.Scattergl(x=xy[m, 0], y=xy[m, 1], mode="markers", name=name,
                                       customdata=m, hovertemplate=hover,
                                       marker=dict(size=3, color=CATEGORY_COLOURS.get(
                                           name, "#7f7f7f"), opacity=0.7)))
    else:
        col = {"probability": "prob", "loss": "loss", "label quality": "label_quality"}[by]
        values = (t[col] if col in t else pd.Series(np.nan, index=t.index)).to_numpy(float)
        lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0, 1)
        rgb = scatter.viridis_rgb(values, lo, hi)
        fig.add_trace(go.Scattergl(x=xy[rows, 0], y=xy[rows, 1], mode="markers", name=by,
                                   customdata=rows, hovertemplate=hover,
                                   marker=dict(size=3, color=values[rows], cmin=lo, cmax=hi,
                                               colorscale="Viridis", showscale=True,
                                               opacity=0.7, colorbar=dict(title=by))))
    if big:
        box = scatter.bounds(xy)
        scatter.image_layer(fig, _points_image(xy, rgb, box), box)
    fig.update_layout(dragmode="select", height=620, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(itemsizing="constant"), xaxis=dict(visible=False),
                      yaxis=dict(visible=False))
    return fig


def _job_key(c) -> str:
    return f"embed::{c.run_dir}::{c.src_key.spec}::{c.src_key.split}"


def _start(c) -> None:
    """`python -m model.embed RUN --data D --method pca` in the background: minutes on a
    large source, and the viewer stays usable meanwhile (the page shows its progress)."""
    jobs.start(_job_key(c), "model.embed",
               [str(c.run_dir), "--data", c.src_key.spec, "--split", c.src_key.split,
                "--checkpoint", c.run_key.checkpoint, "--method", "pca"], "Embeddings")


def _selected_rows(event, xy: np.ndarray) -> list[int]:
    """Rows of all points inside the boxes and lassos (the markers may be a sample; shift
    adds a region), or the clicked markers' rows."""
    sel = (event or {}).get("selection", {}) if event else {}
    regions = [embeddings.rows_in_region(xy, box=(b["x"], b["y"])) for b in sel.get("box", [])]
    regions += [embeddings.rows_in_region(xy, lasso=(g["x"], g["y"]))
                for g in sel.get("lasso", [])]
    if regions:
        return np.unique(np.concatenate(regions)).tolist()
    rows = []
    for p in sel.get("points", []):
        c = p.get("customdata")
        if c is not None:
            rows.append(int(c[0] if isinstance(c, list) else c))
    return rows


def render(c) -> None:
    if not ui.need_source(c) or not ui.need_run(c, "The map"):
        return
    emb = preds.embeddings(c)
    if emb is None:
        err = jobs.last_error(_job_key(c))
        if err:
            st.error(err)
        if jobs.running(_job_key(c)):
            jobs.panel(_job_key(c))
            return
        st.info(f"The map needs the run's embeddings of all {len(c.source):,} patches (one "
                "forward pass each, in the background; also `python -m model.embed RUN "
                "--data DATA`).")
        if st.button("Compute the embeddings", key="map_compute", type="primary",
                     icon=":material/scatter_plot:"):
            _start(c)
            st.rerun()
        return
    a, b = st.columns([2, 3])
    # UMAP takes minutes on a large source: the default until it has been computed is PCA
    cached = "umap" if (emb.dir / "map-umap.npy").exists() else "pca"
    method = a.segmented_control("Layout", ["umap", "pca"], default=cached, key="map_method",
                                 format_func={"umap": "UMAP", "pca": "PCA (fast)"}.get) or "pca"
    by = b.selectbox("Colour by", COLOURS, key="map_colour")
    with st.spinner(f"Computing the {method.upper()} layout of {len(emb):,} patches..."):
        xy = preds.map_xy(c, emb, method)
    t, pset = preds.patch_table(c)
    st.caption(f"{len(emb):,} patches · embeddings of run {c.run_name} "
               f"({emb.meta.get('dim')} PCA dimensions, "
               f"{emb.meta.get('explained_variance', 0):.0%} of the variance)"
               + (f" · predictions: {pset.origin}" if pset is not None else "")
               + (f" · all points drawn, {scatter.POINTS_MAX:,} of them (a random sample, "
                  "small groups whole) hoverable" if len(xy) > scatter.POINTS_MAX else "")
               + ". Box or lasso select (toolbar) to see the patches.")
    event = st.plotly_chart(_figure(xy, t, _categories(c, t, by), by), key="map_chart",
                            on_select="rerun", selection_mode=("box", "lasso", "points"))
    rows = _selected_rows(event, xy)
    if not rows:
        return
    st.subheader(f"Selection: {len(rows):,} patches" + (f" (first {GRID_MAX} shown)"
                                                        if len(rows) > GRID_MAX else ""))
    part = t.loc[rows[:GRID_MAX]]
    imgs = [ui.patch_image(x, lab, 96) for x, lab in zip(c.source.read_batch(part.index),
                                                          part["label"])]
    caps = [ui.caption(r.id, r.label, r.prob) for r in part.itertuples()]
    clicked = ui.grid(imgs, caps, buttons=list(part["id"]), key="map_grid", width=128)
    if clicked:
        st.session_state["map_focus"] = clicked
    focus = st.session_state.get("map_focus")
    if focus in set(part["id"]):
        st.markdown(f"**Most similar to {focus}** (cosine of the embeddings)")
        frame.similar_grid(c, emb, c.source.index_of(focus), "map_similar")


if __name__ == "__main__":
    frame.run_page(render, "Map")
