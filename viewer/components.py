"""Drawing helpers: patches with the centre box, grids, banners and plotly charts."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from model.data.base import centre_box
from model.nets.transforms import dihedral_views
from model.runs.crossval import view_columns

TUMOUR_RGB = (230, 40, 40)  # box colour of label 1
NORMAL_RGB = (30, 190, 70)  # box colour of label 0
UNKNOWN_RGB = (250, 210, 0)  # box colour when the patch has no label
CLASS_NAMES = {0: "no tumour", 1: "tumour"}


def label_text(label) -> str:
    if label is None or (isinstance(label, float) and math.isnan(label)) or label is pd.NA:
        return "unlabelled"
    return CLASS_NAMES.get(int(label), str(label))


def box_colour(label) -> tuple[int, int, int]:
    t = label_text(label)
    return TUMOUR_RGB if t == "tumour" else NORMAL_RGB if t == "no tumour" else UNKNOWN_RGB


def patch_image(rgb: np.ndarray, label=None, size: int = 192, box: bool = True,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Upscale crisply (nearest neighbour, by a whole factor) and draw the labelled centre
    32x32 box just outside that region, so no centre pixel is hidden; colour by label.
    `mask` (bool, patch-sized) adds a white outline of ground-truth tumour (synthetic set).
    Grids pass size=96 and let the browser upscale (CSS pixelated, see `crisp_css`): a
    96-px PNG encodes ~6x faster than a 192-px one."""
    import cv2

    f = max(1, round(size / rgb.shape[0]))
    img = np.ascontiguousarray(np.repeat(np.repeat(rgb, f, 0), f, 1)) if f > 1 \
        else np.array(rgb, copy=True)
    n = img.shape[0]
    t = f
    if mask is not None and mask.any():
        m = np.repeat(np.repeat(mask.astype(np.uint8), f, 0), f, 1)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (255, 255, 255), t)
    if box:
        x0, y0, x1, y1 = centre_box(n)
        c = box_colour(label)
        a, b = max(0, x0 - t), min(n, x1 + t)
        img[max(0, y0 - t):y0, a:b] = c
        img[y1:min(n, y1 + t), a:b] = c
        img[a:b, max(0, x0 - t):x0] = c
        img[a:b, x1:min(n, x1 + t)] = c
    return img


def crisp_css() -> None:
    """Make the browser upscale patch images with nearest neighbour (no blur)."""
    st.html("<style>[data-testid='stImage'] img, [data-testid='stFullScreenFrame'] img "
            "{image-rendering: pixelated; outline: 1px solid rgba(128,128,128,.25);}</style>")


def caption(pid: str, label=None, prob=None, short: int = 14) -> str:
    pid = pid if len(pid) <= short else pid[:short] + "…"
    p = "" if prob is None or (isinstance(prob, float) and math.isnan(prob)) \
        else f" · p={prob:.2f}"
    return f"{pid} · {label_text(label)}{p}"


def legend() -> None:
    st.caption("Box = the labelled centre 32×32 (the rim is context only): "
               ":red[**red**] tumour · :green[**green**] no tumour · :orange[**yellow**] "
               "unlabelled. p = predicted probability of tumour.")


def grid(images: list[np.ndarray], captions: list[str], n_cols: int = 6,
         buttons: list[str] | None = None, key: str = "grid", width: int | None = None
         ) -> str | None:
    """Image cards that wrap to the window: `width` px each (or `n_cols` columns when no
    width is given). With `buttons` (one id per image) each card gets a "details" button.
    Returns the id whose button was clicked."""
    clicked = None
    if width is None:
        for r in range(0, len(images), n_cols):
            for col, i in zip(st.columns(n_cols), range(r, min(r + n_cols, len(images)))):
                with col:
                    st.image(images[i], caption=captions[i])
        return None
    with st.container(horizontal=True, gap="small"):
        for i, img in enumerate(images):
            with st.container(width=width, gap=None):
                st.image(img, caption=captions[i], width=width)
                if buttons is not None and st.button(
                        "details", key=f"{key}-{i}-{buttons[i]}", type="tertiary",
                        icon=":material/zoom_in:", help=buttons[i]):
                    clicked = buttons[i]
    return clicked


def synthetic_banner(what: str = "The data source") -> None:
    st.warning(f"**SYNTHETIC DATA** — {what} is the built-in procedural PCam-like set, not "
               "real tissue. Use it to try the tool, never to judge a model.",
               icon=":material/science:")


def need_run(c, what: str = "This page") -> bool:
    """Explain what to do when no usable run is selected; True when one is."""
    if c.run_error:
        st.error(c.run_error)
        return False
    if c.run_key is None:
        st.info(f"{what} needs a trained run. None is selected: pick one in the sidebar, or "
                "train one — the sidebar's **Train a demo model** button, or "
                "`python -m model.train --data <folder>` in a terminal.",
                icon=":material/model_training:")
        return False
    return True


def need_source(c) -> bool:
    if c.source is None:
        st.info(f"No data source: {c.source_error or 'choose one in the sidebar.'}",
                icon=":material/folder_off:")
        return False
    return True


# --------------------------------------------------------------------------- charts


def fig_layout(fig, title: str | None = None, height: int = 340):
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=60 if title else 10,
                                                              b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right",
                                  x=1.0, title=None))
    return fig


def confusion_figure(cm: dict):
    import plotly.graph_objects as go

    z = [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]
    row = [cm["tn"] + cm["fp"], cm["fn"] + cm["tp"]]
    names = [["TN", "FP"], ["FN", "TP"]]
    text = [[f"{names[i][j]}<br>{z[i][j]}<br>{(z[i][j] / row[i] if row[i] else 0):.1%} of row"
             for j in range(2)] for i in range(2)]
    fig = go.Figure(go.Heatmap(z=z, x=["pred no tumour", "pred tumour"],
                               y=["true no tumour", "true tumour"], text=text,
                               texttemplate="%{text}", colorscale="Blues", showscale=False))
    fig.update_yaxes(autorange="reversed")
    return fig_layout(fig, f"Confusion at threshold {cm['threshold']:.2f}", 320)


def roc_figure(curves: dict[str, pd.DataFrame], point: tuple[float, float] | None = None):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, d in curves.items():
        fig.add_trace(go.Scatter(x=d["fpr"], y=d["tpr"], mode="lines", name=name,
                                 customdata=d["threshold"],
                                 hovertemplate="FPR %{x:.3f} TPR %{y:.3f} t=%{customdata:.3f}"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(dash="dot", color="grey")))
    if point:
        fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers",
                                 name="operating point", marker=dict(size=12, color="red")))
    fig.update_xaxes(title="false positive rate (1 - specificity)", range=[0, 1])
    fig.update_yaxes(title="true positive rate (sensitivity)", range=[0, 1.02])
    return fig_layout(fig, "ROC", 360)


def pr_figure(d: pd.DataFrame, point: tuple[float, float] | None = None):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=d["recall"], y=d["precision"], mode="lines", name="PR",
                               line_shape="hv"))
    if point:
        fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers",
                                 name="operating point", marker=dict(size=12, color="red")))
    fig.update_xaxes(title="recall (sensitivity)", range=[0, 1])
    fig.update_yaxes(title="precision", range=[0, 1.02])
    return fig_layout(fig, "Precision-recall", 360)


def calibration_figure(bins: pd.DataFrame, ece: float):
    import plotly.graph_objects as go

    b = bins[bins["count"] > 0]
    fig = go.Figure(go.Scatter(x=b["mean_prob"], y=b["frac_pos"], mode="lines+markers",
                               name="model", customdata=b["count"],
                               hovertemplate="mean p %{x:.2f} → %{y:.2f} tumour "
                                             "(%{customdata} patches)"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                             line=dict(dash="dot", color="grey")))
    fig.update_xaxes(title="mean predicted probability", range=[0, 1])
    fig.update_yaxes(title="fraction tumour", range=[0, 1])
    return fig_layout(fig, f"Calibration (ECE {ece:.3f})", 360)


def histogram(probs, labels=None, title: str = "Predicted probability of tumour"):
    import plotly.express as px

    d = pd.DataFrame({"prob": np.asarray(probs, float)})
    color = None
    if labels is not None and not pd.isna(labels).all():
        d["label"] = [label_text(v) for v in labels]
        color = "label"
    fig = px.histogram(d, x="prob", color=color, nbins=40, range_x=[0, 1], barmode="overlay",
                       color_discrete_map={"tumour": "#e62828", "no tumour": "#1ebe46"})
    fig.update_xaxes(title="P(tumour)")
    fig.update_yaxes(title="patches")
    return fig_layout(fig, title, 300)


def line_figure(df: pd.DataFrame, x: str, ys: list[str], title: str, log_x: bool = False,
                ytitle: str | None = None):
    import plotly.express as px

    long = df.melt(id_vars=[x], value_vars=[y for y in ys if y in df], var_name="series")
    fig = px.line(long, x=x, y="value", color="series", markers=len(df) < 60, log_x=log_x)
    fig.update_yaxes(title=ytitle or "")
    if x == "epoch":
        fig.update_xaxes(dtick=1)
    return fig_layout(fig, title, 300)


def queue_reason(row, rgb: np.ndarray) -> None:
    """Why an out-of-fold patch is in the review queue: cleanlab's label quality and
    suggestion, the fold that predicted it, and its 8 TTA views with their probabilities."""
    if "label_quality" not in row or pd.isna(row["label_quality"]):
        return
    flagged = bool(row["label_issue"])
    label = int(row["label"])
    suggested = int(row["suggested_label"])
    verdict = (f":red[**likely mislabelled**] (confident learning flags it; suggested "
               f"label: **{label_text(suggested)}**)" if flagged else
               "not flagged by confident learning")
    st.markdown(f"**Why it is here:** {verdict}  \n"
                f"Label quality **{row['label_quality']:.3f}** (cleanlab self-confidence: the "
                f"out-of-fold probability of the given label, {label_text(label)}; low = "
                f"suspicious) · rank {int(row['issue_rank']):,} · predicted by fold "
                f"{int(row['fold'])}'s model, which never saw this patch")
    cols = view_columns(row)
    if not cols:
        return
    probs = [float(row[c]) for c in cols]
    st.markdown(f"**TTA views** (spread {row['tta_spread']:.3f}: the standard deviation of "
                "these 8 probabilities; wide = the model is unsure)")
    views = dihedral_views(rgb, len(cols))
    st.image([patch_image(v, label, 96) for v in views], width=72,
             caption=[f"p={p:.2f}" for p in probs])
