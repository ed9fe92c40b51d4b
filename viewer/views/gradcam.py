"""Grad-CAM: where the model looks, for one patch or a gallery (top losses, most confident
correct, random). The original with its centre box beside the overlay."""
from __future__ import annotations

import streamlit as st

from model.core.errors import PcamLensError
from model.evaluation.metrics import sample_sets
from viewer import components as ui
from viewer import frame, preds

TARGETS = {"predicted class": None, "tumour": 1, "no tumour": 0}
GALLERIES = {"top losses": "top_losses", "most confident correct": "confident_correct",
             "random": "random"}


def render(c) -> None:
    if not ui.need_run(c, "Grad-CAM") or not ui.need_source(c):
        return
    layers = preds.gradcam_layer_names(c.run_key)
    a, b, d = st.columns(3)
    layer = a.selectbox("Layer", layers, index=0, key="g_layer",
                        format_func=lambda n: f"{n} (default)" if n == layers[0] else n,
                        help="The first is the default: the last block at stride 16, fine "
                             "enough to tell the centre 32x32 from the rim.")
    alpha = b.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="g_alpha")
    target = d.segmented_control("Explain class", list(TARGETS), default="predicted class",
                                 key="g_target") or "predicted class"
    mode = st.segmented_control("Show", ["one patch", *GALLERIES], default="top losses",
                                key="g_mode") or "top losses"
    if mode == "one patch":
        pid = st.text_input("Patch id", value=c.source.ids[0], key="g_id").strip()
        try:
            c.source.index_of(pid)
        except PcamLensError as e:
            st.error(str(e))
            return
        rows = [(c.src_key, c.source, pid)]
    else:
        rows = _gallery_rows(c, GALLERIES[mode])
        if rows is None:
            return
    ui.legend()
    t = TARGETS[target]
    sk, src = rows[0][0], rows[0][1]
    pids = [pid for _, _, pid in rows]
    idx = [src.index_of(pid) for pid in pids]
    x = src.read_batch(idx)
    if len(pids) == 1 and sk is not None:
        heats = [preds.gradcam_heat(c.run_key, sk, pids[0], layer, t)]
    elif sk is not None:
        heats = preds.gradcam_heats(c.run_key, sk, tuple(pids), layer, t)
    else:
        heats = preds.gradcam_arrays(c.run_key, x, layer, t)
    probs = (preds.page_probs(c.run_key, sk, tuple(int(i) for i in idx)) if sk is not None
             else preds.predict_page(c.run_key, x))
    labels = [None if src.labels is None else int(src.labels[i]) for i in idx]
    for k in range(0, len(pids), 2):
        cols = st.columns(2)
        for col, j in zip(cols, range(k, min(k + 2, len(pids)))):
            with col.container(border=True):
                a, b = st.columns(2)
                a.image(ui.patch_image(x[j], labels[j], 288),
                        caption=ui.caption(pids[j], labels[j], probs[j], short=24))
                b.image(ui.patch_image(preds.overlay(x[j], heats[j], alpha), labels[j], 288),
                        caption=f"Grad-CAM · {layer} · {target}")


def _gallery_rows(c, which: str):
    pset = preds.best_predictions(c)
    if pset is None or pset.df["label"].isna().all():
        st.info("Galleries need labelled predictions: the run's validation predictions, or "
                "predictions of a labelled source (Metrics page → all patches).")
        return None
    if pset.source is None:
        st.warning("The run's data cannot be opened here: choose it in the sidebar.")
        return None
    st.caption(f"From {pset.origin}")
    df = pset.df[pset.df["idx"] >= 0].dropna(subset=["label"])
    if df.empty:
        st.info("None of these predictions' patches can be read from here.")
        return None
    sets = sample_sets(df[["id", "label", "prob", "loss"]], k=8)
    sk = c.src_key if pset.source is c.source else None
    return [(sk, pset.source, pid) for pid in sets[which]["id"]] or None


if __name__ == "__main__":
    frame.run_page(render, "Grad-CAM")
