"""Grad-CAM: where the model looks, for one patch or a gallery (top losses, most confident
correct, random). The original with its centre box beside the overlay."""
from __future__ import annotations

import streamlit as st

from viewer import components as ui
from viewer import frame, state

TARGETS = {"predicted class": None, "tumour": 1, "no tumour": 0}
GALLERIES = {"top losses": "top_losses", "most confident correct": "confident_correct",
             "random": "random"}


def render(c) -> None:
    if not ui.need_run(c, "Grad-CAM") or not ui.need_source(c):
        return
    layers = state.gradcam_layer_names(c.run_key)
    a, b, d = st.columns(3)
    layer = a.selectbox("Layer", layers, index=0, key="g_layer",
                        help="The first is the default: the last block at stride 16, fine "
                             "enough to tell the centre 32x32 from the rim.")
    alpha = b.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="g_alpha")
    target = d.segmented_control("Explain class", list(TARGETS), default="predicted class",
                                 key="g_target") or "predicted class"
    mode = st.segmented_control("Show", ["one patch", *GALLERIES], default="top losses",
                                key="g_mode") or "top losses"
    if mode == "one patch":
        pid = st.text_input("Patch id", value=c.source.ids[0], key="g_id").strip()
        rows = [(c.src_key, c.source, pid)]
    else:
        rows = _gallery_rows(c, GALLERIES[mode])
        if rows is None:
            return
    ui.legend()
    for k in range(0, len(rows), 2):
        cols = st.columns(2)
        for col, (sk, src, pid) in zip(cols, rows[k:k + 2]):
            with col.container(border=True):
                _pair(c, sk, src, pid, layer, TARGETS[target], alpha)


def _gallery_rows(c, which: str):
    from model.metrics import sample_sets

    preds = state.best_predictions(c)
    if preds is None or preds.df["label"].isna().all():
        st.info("Galleries need labelled predictions: the run's validation predictions, or "
                "predictions of a labelled source (Metrics page → all patches).")
        return None
    if preds.source is None:
        st.warning("The run's data cannot be opened here: choose it in the sidebar.")
        return None
    st.caption(f"From {preds.origin}")
    df = preds.df.dropna(subset=["label"])
    sets = sample_sets(df[["id", "label", "prob", "loss", "idx"]], k=8)
    sk = c.src_key if preds.source is c.source else None
    return [(sk, preds.source, pid) for pid in sets[which]["id"]]


def _pair(c, sk, src, pid: str, layer: str, target, alpha: float) -> None:
    i = src.index_of(pid)
    x = src.read(i)
    label = None if src.labels is None else int(src.labels[i])
    if sk is not None:
        heat = state.gradcam_heat(c.run_key, sk, pid, layer, target)
    else:
        heat = state.gradcam_arrays(c.run_key, x[None], layer, target)[0]
    prob = float(state.predict_arrays(c.run_key, x[None])[0] if sk is None
                 else state.page_probs(c.run_key, sk, (int(i),))[0])
    a, b = st.columns(2)
    a.image(ui.patch_image(x, label, 256), caption=ui.caption(pid, label, prob, short=24))
    b.image(ui.patch_image(state.overlay(x, heat, alpha), label, 256),
            caption=f"Grad-CAM · {layer}")


if __name__ == "__main__":
    frame.run_page(render, "Grad-CAM")
