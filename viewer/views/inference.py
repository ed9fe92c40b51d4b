"""Inference: a chosen run on a test folder, a PCam test file, the chosen source or uploaded
images; TTA, progress, histogram of probabilities, a browsable grid, submission.csv."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import streamlit as st

from model.data.uploads import decode_uploads
from model.evaluation.engine import describe_engine
from viewer import components as ui
from viewer import frame, preds, state

MAX_FILES = 200
MAX_MB = 20
UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff"]
INPUTS = {"source": "Chosen data source (sidebar)", "path": "Test folder or PCam .h5 file",
          "upload": "Upload images"}


def render(c) -> None:
    if not ui.need_run(c, "Inference"):
        return
    which = st.segmented_control("Input", list(INPUTS), format_func=INPUTS.get,
                                 default="path", key="i_input") or "path"
    tta = st.segmented_control("Test-time augmentation (dihedral views averaged)", [1, 2, 4, 8],
                               default=1, key="i_tta", format_func=lambda k: f"×{k}") or 1
    if which == "upload":
        _upload(c, tta)
    else:
        _source_input(c, which, tta)
    res = st.session_state.get("i_result")
    if res and res["run_key"] == c.run_key:
        _results(res)


def _source_input(c, which: str, tta: int) -> None:
    if which == "source":
        if not ui.need_source(c):
            return
        sk, src = c.src_key, c.source
    else:
        path = st.text_input("Path", key="i_path",
                             placeholder="/data/pcam/test  or  camelyonpatch_level_2_split_test"
                                         "_x.h5").strip()
        if not path:
            st.caption("A Kaggle folder (its test/ split), a flat folder of images, or a PCam "
                       "_x.h5 file.")
            return
        sk = state.source_key(path, "test")
        src = state.open_source_cached(sk)
    st.caption(src.describe_short())
    if st.button(f"Predict {len(src):,} patches", type="primary", key="i_go",
                 icon=":material/play_arrow:"):
        bar = st.progress(0.0, text="Predicting...")
        t0 = time.perf_counter()

        def cb(done, total):
            bar.progress(done / max(total, 1), text=f"Predicting: {done:,} of {total:,}")

        df = preds.predict_source(c.run_key, sk, tta, cb)
        bar.empty()
        st.session_state["i_result"] = {
            "run_key": c.run_key, "what": src.describe_short(), "tta": tta, "sk": sk,
            "df": df[["id", "label", "prob", "idx"]], "pixels": None,
            "seconds": time.perf_counter() - t0, "notes": [],
            "engine": df.attrs.get("engine")}


def _upload(c, tta: int) -> None:
    files = st.file_uploader(f"Patches (PNG, JPEG or TIFF; up to {MAX_FILES} files of "
                             f"{MAX_MB} MB)", type=UPLOAD_TYPES, accept_multiple_files=True,
                             key="i_files", max_upload_size=MAX_MB)
    if not files:
        return
    if len(files) > MAX_FILES:
        st.error(f"{len(files)} files uploaded; at most {MAX_FILES} at a time. Remove some, or "
                 "put them in a folder and use the folder input.")
        return
    if st.button(f"Predict {len(files)} uploaded images", type="primary", key="i_go_up",
                 icon=":material/play_arrow:"):
        up = decode_uploads([(f.name, f.getvalue()) for f in files],
                            state.loaded(c.run_key).input.patch)
        ids, pix, notes = up.ids, up.pixels, up.notes
        if not pix:
            for n in notes:
                st.warning(n)
            st.error("None of the uploaded files is a readable image.")
            return
        x = np.stack(pix)
        t0 = time.perf_counter()
        with st.spinner(f"Predicting {len(x)} patches..."):
            probs = preds.predict_page(c.run_key, x, tta)
        df = pd.DataFrame({"id": ids, "label": np.nan, "prob": probs,
                           "idx": np.arange(len(ids))})
        st.session_state["i_result"] = {
            "run_key": c.run_key, "what": f"{len(ids)} uploaded images", "tta": tta,
            "sk": None, "df": df, "pixels": x, "seconds": time.perf_counter() - t0,
            "notes": notes}


def _results(res: dict) -> None:
    df = res["df"]
    st.divider()
    st.subheader(f"Results: {res['what']}")
    for n in res["notes"][:20]:
        st.warning(n)
    if len(res["notes"]) > 20:
        st.caption(f"... and {len(res['notes']) - 20} more notes.")
    n_pos = int((df["prob"] >= 0.5).sum())
    a, b, d = st.columns(3)
    a.metric("Patches", f"{len(df):,}")
    b.metric("Predicted tumour (p ≥ 0.5)", f"{n_pos:,}")
    d.metric("Time", f"{res['seconds']:.1f} s", f"TTA ×{res['tta']}", delta_color="off",
             delta_arrow="off")
    if res.get("engine"):
        st.caption(f"Engine: {describe_engine(res['engine'])}")
    st.plotly_chart(ui.histogram(df["prob"], df["label"]), key="i_hist")
    fmt = st.segmented_control("submission.csv label", ["probability", "0/1 at 0.5"],
                               default="probability", key="i_fmt") or "probability"
    sub = pd.DataFrame({"id": df["id"], "label": df["prob"] if fmt == "probability"
                        else (df["prob"] >= 0.5).astype(int)})
    st.download_button("Download submission.csv", sub.to_csv(index=False),
                       file_name="submission.csv", mime="text/csv", key="i_dl",
                       icon=":material/download:")
    st.caption("Kaggle scores ROC AUC, so submit probabilities.")
    order = st.selectbox("Sort", ["probability (highest first)", "probability (lowest first)",
                                  "id"], key="i_sort")
    d = df.sort_values("id" if order == "id" else ["prob", "id"],
                       ascending=order != "probability (highest first)")
    pages = max(1, math.ceil(len(d) / 48))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="i_page")
    part = d.iloc[(page - 1) * 48: page * 48]
    if res["pixels"] is not None:
        pix = res["pixels"][part["idx"].to_numpy()]
    else:
        pix = state.open_source_cached(res["sk"]).read_batch(part["idx"].to_numpy())
    ui.legend()
    ui.grid([ui.patch_image(x, lab, 96) for x, lab in zip(pix, part["label"])],
            [ui.caption(r.id, r.label, r.prob) for r in part.itertuples()], 7, key="i_grid",
            width=160)


if __name__ == "__main__":
    frame.run_page(render, "Inference")
