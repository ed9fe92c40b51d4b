"""What every page shares: the header with the data/run banners, error handling, and the
widgets that choose which predictions a page looks at."""
from __future__ import annotations

import time
import traceback

import streamlit as st

from model.core.errors import PcamLensError
from viewer import components as ui
from viewer import preds, state


def run_page(render, title: str) -> None:
    """Header + banners, then `render(ctx)`; a PcamLensError becomes st.error(message)."""
    st.title(title)
    ui.crisp_css()
    c = state.ctx()
    if c.source is not None:
        if c.synthetic:
            ui.synthetic_banner()
        st.caption(f"Data: {c.source.describe_short()}"
                   + (f" · Run: **{c.run_name}**" if c.run_dir else " · no run selected"))
    guarded(render, c)


def guarded(fn, *args) -> None:
    """Run fn(*args); a PcamLensError becomes st.error(message), a bug a short error with the
    traceback folded away. Also used inside dialogs/fragments, which rerun on their own."""
    try:
        fn(*args)
    except PcamLensError as e:
        st.error(str(e), icon=":material/error:")
    except Exception as e:  # a bug, not bad input: say so, keep the details folded away
        st.error(f"Unexpected error ({type(e).__name__}): {e}", icon=":material/bug_report:")
        with st.expander("Details for developers"):
            st.code("".join(traceback.format_exception(e)), language="text")


def predictions_picker(c: state.Context, key: str, need_labels: bool = True
                       ) -> preds.Predictions | None:
    """Let the user pick the run's validation predictions or whole-source predictions of the
    chosen source (computed on demand with a progress bar). None when there are none yet."""
    options = ["validation", "source"]
    cv = preds.crossval_for(c)
    names = {"validation": f"Validation split of run {c.run_name}",
             "source": "All patches of the chosen data source",
             "oof": f"Out-of-fold, all labelled patches ({cv.name})" if cv else ""}
    if c.source is None:
        options = ["validation"]
    if need_labels and c.source is not None and not c.source.labelled:
        options = ["validation"]
        st.caption("The chosen source has no labels, so only the run's validation split can "
                   "be scored here (predict unlabelled data on the Inference page).")
    if c.run_dir is None:
        options = []
    if cv is not None:
        options = ["oof", *options]
    if not options:
        st.info("Select a run, or run a cross-validation on this data "
                "(python -m model.crossval --data DATA).")
        return None
    which = st.segmented_control("Predictions", options, format_func=names.get,
                                 default=options[0], key=f"{key}-which") or options[0]
    if which == "oof":
        return preds.oof_predictions(c)
    if which == "validation":
        p = preds.validation_predictions(c)
        if p is None:
            st.info(f"Run {c.run_name} has no valid_predictions.csv yet (it is written after "
                    "the first epoch).")
        return p
    p = preds.source_predictions(c)
    if p is not None:
        if p.warning:
            st.warning(p.warning, icon=":material/warning:")
        return p
    n = len(c.source)
    st.info(f"Predictions for all {n:,} patches of this source are not computed yet"
            + (" — this can take a long time on a CPU." if n > state.BIG_SOURCE else "."))
    if st.button(f"Predict all {n:,} patches", key=f"{key}-predict", type="primary",
                 icon=":material/play_arrow:"):
        return predict_with_progress(c)
    return None


def predict_with_progress(c: state.Context) -> preds.Predictions:
    bar = st.progress(0.0, text="Predicting...")
    t0 = time.perf_counter()

    def cb(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-6)
        bar.progress(done / max(total, 1),
                     text=f"Predicting: {done:,} of {total:,} patches ({rate:.0f}/s)")

    p = preds.compute_source_predictions(c, progress=cb)
    bar.empty()
    return p


def read_patches(pset: preds.Predictions, rows) -> list | None:
    """Pixels of prediction rows (a DataFrame slice), or None when they cannot be read."""
    if pset.source is None or (rows["idx"] < 0).any():
        return None
    return list(pset.source.read_batch(rows["idx"].to_numpy()))


def patch_rows_grid(pset: preds.Predictions, rows, key: str, n_cols: int = 6,
                    size: int = 160, buttons: bool = False) -> str | None:
    """A small grid of prediction rows (id, label, prob), centre box drawn."""
    if rows.empty:
        st.caption("No patches.")
        return None
    pix = read_patches(pset, rows)
    if pix is None:
        st.warning("The patches' pixels are not available (the run's data cannot be opened "
                   "from here). Choose the run's data source in the sidebar.")
        st.dataframe(rows[["id", "label", "prob", "loss"]], hide_index=True)
        return None
    imgs = [ui.patch_image(x, lab, 96) for x, lab in zip(pix, rows["label"])]
    caps = [ui.caption(r.id, r.label, r.prob) for r in rows.itertuples()]
    return ui.grid(imgs, caps, n_cols, buttons=list(rows["id"]) if buttons else None, key=key,
                   width=size)


def similar_grid(c, emb, i: int, key: str, k: int = 12) -> None:
    """The k patches most similar to row i (cosine of the embeddings), with label,
    prediction and review status."""
    rows, cos = emb.similar(i, k)
    t, _ = preds.patch_table(c)
    reviewed = state.review_log(c.source).reviewed_ids()
    imgs = [ui.patch_image(x, lab, 96) for x, lab in zip(c.source.read_batch(rows),
                                                          t.loc[rows, "label"])]
    caps = [f"{ui.caption(t.at[r, 'id'], t.at[r, 'label'], t.at[r, 'prob'])} · cos "
            f"{s:.3f}" + (" · reviewed" if t.at[r, "id"] in reviewed else "")
            for r, s in zip(rows, cos)]
    ui.grid(imgs, caps, key=key, width=128)
