"""Slide: a run's tumour heatmap over a whole-slide image (model.slides). Compute it in the
background, look at it over the slide (opacity, threshold, tissue outline), box-select to
zoom in to full resolution (crops read from the slide on the server), click a cell to see
its 96 px patch with the 32x32 box, probability and Grad-CAM, and send it to review."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from model.core.errors import PcamLensError
from model.slides.heatmap import SlideConfig, tumour_mm2
from viewer import components as ui
from viewer import frame, jobs, preds, scatter
from viewer import slides as sl

FIG_HEIGHT = 640


def _choose_slide() -> tuple[str | None, float | None]:
    """(path or None for the synthetic demo, mpp override)."""
    a, b, d = st.columns([1.2, 3, 1])
    kind = a.segmented_control("Slide", ["demo", "file"], default="demo", key="sl_kind",
                               format_func={"demo": "Synthetic demo",
                                            "file": "A slide file"}.get) or "demo"
    if kind == "demo":
        b.caption("A synthetic 8 x 8 mm slide at 10x with known tumour regions (macro- and "
                  "micro-metastases, isolated tumour cells), made on first use.")
        return None, None
    path = b.text_input("Slide path", key="sl_path",
                        placeholder="/data/slides/tumour_001.svs (.svs .tif .ndpi .mrxs .scn; "
                                    ".png/.jpg with µm/px)").strip()
    mpp = d.number_input("µm / px", min_value=0.0, value=0.0, step=0.01, key="sl_mpp",
                         help="Only for a slide that does not say (plain TIFF/PNG); 0 = "
                              "use the slide's own.")
    return (path or None), (mpp or None)


def _cell_points(res, box0: tuple, rows=None) -> go.Scattergl:
    """Invisible square markers as large as the cells on screen, at the cells that ran:
    hover shows p, a click anywhere on a cell selects it."""
    probs, g = res.probs, res.grid
    rc = np.argwhere(np.isfinite(probs))
    if rows is not None:
        (r0, r1), (c0, c1) = rows
        keep = (rc[:, 0] >= r0) & (rc[:, 0] < r1) & (rc[:, 1] >= c0) & (rc[:, 1] < c1)
        rc = rc[keep]
    xy = (rc[:, ::-1] + 0.5) * g.cell0
    custom = np.column_stack([rc, probs[rc[:, 0], rc[:, 1]]])
    on_screen = FIG_HEIGHT * g.cell0 / max(box0[3] - box0[1], 1)  # cell side in px
    return go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", customdata=custom,
                        marker=dict(size=float(np.clip(on_screen, 6, 80)), symbol="square",
                                    color="rgba(0,0,0,0.01)"), showlegend=False,
                        hovertemplate="cell %{customdata[0]:.0f}, %{customdata[1]:.0f}"
                                      "<br>p = %{customdata[2]:.3f}<extra></extra>")


def _image_figure(img: np.ndarray, box0: tuple, points: go.Scattergl) -> go.Figure:
    """The image stretched over its level-0 box, y down like the slide, cells on top."""
    x0, y0, x1, y1 = box0
    fig = go.Figure(points)
    scatter.image_layer(fig, Image.fromarray(img), (x0, x1, y0, y1), y_down=True)
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(height=FIG_HEIGHT, margin=dict(l=0, r=0, t=0, b=0), dragmode="select",
                      clickmode="event+select",
                      plot_bgcolor="white")
    return fig


def _event_cell(event) -> tuple[int, int] | None:
    pts = (event or {}).get("selection", {}).get("points", []) if event else []
    if len(pts) == 1 and pts[0].get("customdata") is not None:
        r, c, _ = pts[0]["customdata"]
        return int(r), int(c)
    return None


def _event_box(event) -> tuple | None:
    boxes = (event or {}).get("selection", {}).get("box", []) if event else []
    if boxes:
        xs, ys = sorted(boxes[0]["x"]), sorted(boxes[0]["y"])
        return xs[0], ys[0], xs[1], ys[1]
    return None


def _cell_at(res, box: tuple | None) -> tuple[int, int] | None:
    """The cell a small box was drawn on (a selection, not a click): of the cells that ran
    and touch the box, the one nearest its centre."""
    if box is None:
        return None
    g = res.grid
    r0, r1 = max(int(box[1] // g.cell0), 0), min(int(box[3] // g.cell0) + 1, g.rows)
    c0, c1 = max(int(box[0] // g.cell0), 0), min(int(box[2] // g.cell0) + 1, g.cols)
    rc = np.argwhere(np.isfinite(res.probs[r0:r1, c0:c1])) + [r0, c0]
    if not len(rc):
        return None
    centre = np.array([(box[1] + box[3]) / 2, (box[0] + box[2]) / 2]) / g.cell0 - 0.5
    r, c = rc[np.argmin(((rc - centre) ** 2).sum(axis=1))]
    return int(r), int(c)


def _summary(res, threshold: float) -> None:
    s, g = res.summary, res.grid
    cols = st.columns(5)
    cols[0].metric("Tiles run", f"{s['tiles']:,}", help=f"{g.rows} x {g.cols} cells of "
                   f"{g.cell0:.1f} level-0 px, level {g.level}, resampled x{g.scale:.3f}")
    cols[1].metric("Tissue", f"{s['tissue_mm2']:.2f} mm²")
    cols[2].metric(f"Tumour at p ≥ {threshold:.2f}",
                   f"{tumour_mm2(res.probs, g, threshold):.3f} mm²")
    cols[3].metric("Slide score (max p)", f"{s['max_prob']:.3f}",
                   help=f"mean of the top 10 cells: {s.get('top10_mean_prob', 0):.3f}")
    cols[4].metric("Time", f"{s['seconds']['total']:.1f} s", help=f"{s['tiles_per_s']:.0f} "
                   "tiles/s; reading waited for: "
                   f"{s['seconds'].get('waited_for_reading', 0):.1f} s")
    score_file = res.dir / "truth_score.json"
    if score_file.exists():
        t = json.loads(score_file.read_text())
        st.caption(f"Against the synthetic slide's ground truth (p ≥ {t['threshold']}): cell "
                   f"AUC {t['cell_auc']}, Dice {t['dice']:.3f}, regions found "
                   f"{t['regions_found']} of {t['regions']} "
                   f"({', '.join(f'{k} {v:.0%}' for k, v in t['sensitivity_by_class'].items())}),"
                   f" {t['false_positives']} false-positive regions.")
    st.caption(f"Results: `{res.dir}` (regions.geojson opens in QuPath: File → Import "
               "objects).")


def _patch_panel(c, s, res, r: int, cc: int, path: str) -> None:
    x, tid = sl.patch(s, res, r, cc)
    p = float(res.probs[r, cc])
    st.subheader(f"Cell ({r}, {cc})")
    left, mid, right = st.columns([1, 1, 1.3])
    left.image(ui.patch_image(x, None, 192), caption=f"{tid} · p={p:.3f}")
    layers = preds.gradcam_layer_names(c.run_key)
    heat = preds.gradcam_arrays(c.run_key, x[None], layers[0], None)[0]
    mid.image(preds.overlay(x, heat, 0.45), caption="Grad-CAM (predicted class)", width=192)
    with right:
        st.markdown(f"**P(tumour in the 32x32 box)** = {p:.3f}")
        if not c.reviewer:
            st.warning("Enter your name under **Review** in the sidebar to send patches to "
                       "review.", icon=":material/badge:")
            return
        log = sl.review_log(path)
        b1, b2, b3 = st.columns(3)
        choice = None
        if b1.button("Tumour", key="sl_tum", icon=":material/coronavirus:"):
            choice = ("relabel", 1, None)
        if b2.button("No tumour", key="sl_neg", icon=":material/check:"):
            choice = ("relabel", 0, None)
        if b3.button("Flag", key="sl_flag", icon=":material/flag:"):
            choice = ("flag", None, "other")
        if choice:
            action, new, reason = choice
            seq = log.record(c.reviewer, c.run_name, tid, action, None, new_label=new,
                             flag_reason=reason, source=f"slide {path}")
            st.success(f"Saved decision #{seq} for {tid} in {log.path}.")
        hist = log.history(tid)
        if not hist.empty:
            st.caption(f"Decisions on this patch: {len(hist)} (last: "
                       f"{hist.iloc[-1]['action']} by {hist.iloc[-1]['reviewer']}).")


def render(c) -> None:
    if not ui.need_run(c, "The slide heatmap"):
        return
    path, mpp = _choose_slide()
    a, b = st.columns(2)
    tta = a.select_slider("TTA views", [1, 2, 4, 8], value=1, key="sl_tta")
    cfg = SlideConfig(mpp=mpp, tta=tta)
    shown = path or str(sl.synthetic_path())
    key = sl.job_key(c.run_dir, shown)
    err = jobs.last_error(key)
    if err:
        st.error(err)
    res = None
    if Path(shown).exists():
        res = sl.result(c.run_dir, c.run_key.checkpoint, shown, cfg)
    if res is None:
        if jobs.running(key):
            jobs.panel(key)
            return
        st.info(f"No heatmap of {Path(shown).name} by run {c.run_name} with these settings "
                "yet (cached per run, slide and settings once computed; also `python -m "
                f"model.slide {c.run_dir}" + (f" --slide {path}`" if path else "`") + ").")
        if st.button("Compute the heatmap", key="sl_go", type="primary",
                     icon=":material/grid_on:"):
            sl.start_job(c.run_dir, c.run_key.checkpoint, path, cfg)
            st.rerun()
        return
    s = sl.slide(shown, mpp)
    alpha = b.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="sl_alpha")
    d, e = st.columns(2)
    threshold = d.slider("Threshold", 0.05, 0.95, 0.5, 0.05, key="sl_thr",
                         help="Cells below it are not coloured; the tumour area uses it.")
    outline = e.toggle("Tissue outline", value=True, key="sl_outline")
    _summary(res, threshold)
    w0, h0 = s.dimensions
    img = sl.overview(res.meta["key"], res, alpha, threshold, outline)
    st.caption("Whole slide: drag a box to zoom in (read at full resolution), click a cell "
               "to open its patch. Colour: turbo, blue p = 0 to red p = 1.")
    ev = st.plotly_chart(_image_figure(img, (0, 0, w0, h0),
                                       _cell_points(res, (0, 0, w0, h0))),
                         key="sl_overview", on_select="rerun",
                         selection_mode=("box", "points"))
    box = _event_box(ev)
    cell = _event_cell(ev)
    if box is not None:
        g = res.grid
        crop, box0, scale = sl.crop(s, res, box, alpha, threshold)
        st.caption(f"Zoom: level-0 box x {box0[0]:,}-{box0[2]:,}, y {box0[1]:,}-{box0[3]:,} "
                   f"at {scale:.2f} level-0 px per screen px"
                   + (" (full resolution)" if scale <= 1.0 else "")
                   + ". Click a cell, or draw a small box on it, to open its patch.")
        rows = ((int(box0[1] // g.cell0), int(np.ceil(box0[3] / g.cell0))),
                (int(box0[0] // g.cell0), int(np.ceil(box0[2] / g.cell0))))
        ev2 = st.plotly_chart(_image_figure(crop, box0, _cell_points(res, box0, rows)),
                              key="sl_zoom", on_select="rerun", selection_mode=("points", "box"))
        cell = _event_cell(ev2) or _cell_at(res, _event_box(ev2)) or cell
    if cell is not None:
        try:
            _patch_panel(c, s, res, *cell, shown)
        except PcamLensError as e_:
            st.error(str(e_))


if __name__ == "__main__":
    frame.run_page(render, "Slide")
