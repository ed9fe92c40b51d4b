"""Review: a pathologist goes through the run's top losses (or most uncertain, or missed
tumours first) and confirms, relabels, flags or skips each patch. Every decision is written
at once to the SQLite review log beside the data (model.review.log); the queue resumes where it
was left because reviewed ids of this run are excluded."""
from __future__ import annotations

import streamlit as st

from model.core.errors import PcamLensError
from model.review.log import ReviewLog, review_queue
from viewer import components as ui
from viewer import frame, preds, state

ORDERS = {"label_errors": "Likely label errors", "spread": "Most uncertain (TTA spread)",
          "top_losses": "Top losses", "uncertain": "Closest to 0.5",
          "false_negatives_first": "False negatives first"}
OOF_ONLY = ("label_errors", "spread")  # need out-of-fold predictions (model.crossval)
REASONS = {"artefact": "artefact", "out_of_focus": "out of focus", "no_tissue": "no tissue",
           "other": "other"}
KEYS = {"confirm": "A", "relabel": "L", "flag": "F", "skip": "S"}


def _decide(log_path: str, reviewer: str, run: str, pid: str, action: str, old: int,
            source: str) -> None:
    """Button callback: append the decision, then clear the note for the next patch."""

    ss = st.session_state
    try:
        seq = ReviewLog(log_path).record(
            reviewer, run, pid, action, old, new_label=1 - old if action == "relabel" else None,
            flag_reason=ss.get("rv_reason") if action == "flag" else None,
            note=ss.get("rv_note", ""), source=source)
    except PcamLensError as e:
        ss["rv_error"] = str(e)
        return
    ss["rv_note"] = ""
    ss["rv_saved"] = f"Saved decision #{seq}: {action} {pid}."


def render(c) -> None:
    if preds.crossval_for(c) is None and not ui.need_run(c, "Review"):
        return
    st.caption("Keyboard: **A** confirm · **L** relabel · **F** flag · **S** skip (while the "
               "focus is not in a text field); Tab and Enter also reach every button.")
    if not c.reviewer:
        st.warning("Enter your name under **Review** in the sidebar to record decisions. It is "
                   "stored with each decision; it is a name, not authentication.",
                   icon=":material/badge:")
    pset = frame.predictions_picker(c, "rv")
    if pset is None:
        return
    if pset.source is None:
        st.warning("The run's data cannot be opened here: choose it in the sidebar.")
        return
    log = state.review_log(pset.source)
    orders = [o for o in ORDERS if pset.out_of_fold or o not in OOF_ONLY]
    order = st.segmented_control("Queue order", orders, format_func=ORDERS.get,
                                 default=orders[0], key="rv_order") or orders[0]
    if order not in orders:
        order = orders[0]
    if not pset.out_of_fold:
        st.caption("Likely label errors and TTA spread need out-of-fold predictions for every "
                   "patch: run `python -m model.crossval --data DATA` (they then show here).")
    df = pset.df.dropna(subset=["label"])
    # out-of-fold: a decision on a patch counts whichever run it was made from
    reviewer_run = pset.origin_run if pset.out_of_fold else c.run_name
    queue, done, total = review_queue(
        df, order, log.reviewed_ids(run=None if pset.out_of_fold else c.run_name))
    st.progress(done / max(total, 1), text=f"{done:,} of {total:,} reviewed · {pset.origin}")
    for k, show in (("rv_saved", st.success), ("rv_error", st.error)):
        if k in st.session_state:
            show(st.session_state.pop(k))
    if queue.empty:
        st.success("Every patch of this queue has a decision.")
    else:
        _item(c, pset, log, queue.iloc[0], reviewer_run)
    _export(log, pset)


def _item(c, pset, log, row, run_name: str) -> None:
    src = pset.source
    pid, old = str(row["id"]), int(row["label"])
    x = src.read(int(row["idx"]))
    st.subheader(f"Patch {pid}")
    left, right = st.columns([3, 2])
    with left:
        show_cam = st.toggle("Grad-CAM", key="rv_cam", disabled=c.run_key is None,
                             help=None if c.run_key else "Select a run for Grad-CAM.")
        if show_cam:
            layer = preds.gradcam_layer_names(c.run_key)[0]
            heat = (preds.gradcam_heat(c.run_key, c.src_key, pid, layer, None)
                    if src is c.source else preds.gradcam_arrays(c.run_key, x[None], layer,
                                                                 None)[0])
            a, b = st.columns(2)
            a.image(ui.patch_image(x, old, 320), caption="patch")
            b.image(ui.patch_image(preds.overlay(x, heat, 0.45), old, 320),
                    caption="Grad-CAM (predicted class)")
        else:
            st.image(ui.patch_image(x, old, 480), caption="Box = labelled centre 32×32")
    with right:
        pred = "tumour" if row["prob"] >= 0.5 else "no tumour"
        st.markdown(f"**Label:** {ui.label_text(old)}  \n**Model:** p(tumour) = "
                    f"{row['prob']:.3f} → {pred}  \n**Loss:** {row['loss']:.3f}")
        if pset.out_of_fold:
            ui.queue_reason(row, x)
        hist = log.history(pid)
        if not hist.empty:
            st.caption(f"Earlier decisions: {len(hist)} (last: {hist.iloc[-1]['action']} by "
                       f"{hist.iloc[-1]['reviewer']})")
        st.text_input("Note (optional)", key="rv_note")
        st.selectbox("Flag reason (used by Flag)", list(REASONS), format_func=REASONS.get,
                     key="rv_reason")
        args = (str(log.path), c.reviewer, run_name, pid)
        source = src.describe_short()
        off = not c.reviewer
        if c.reviewer:
            st.caption(f"Recording as **{c.reviewer}** (a name typed in the sidebar, not "
                       "authentication).")
        b1, b2 = st.columns(2)
        b1.button("Confirm label", type="primary", on_click=_decide, disabled=off,
                  args=(*args, "confirm", old, source), shortcut=KEYS["confirm"],
                  icon=":material/check:", key="rv_confirm", width="stretch")
        b2.button(f"Relabel as {ui.label_text(1 - old)}", on_click=_decide, disabled=off,
                  args=(*args, "relabel", old, source), shortcut=KEYS["relabel"],
                  icon=":material/swap_horiz:", key="rv_relabel", width="stretch")
        b1.button("Flag", on_click=_decide, disabled=off, args=(*args, "flag", old, source),
                  shortcut=KEYS["flag"], icon=":material/flag:", key="rv_flag",
                  width="stretch")
        b2.button("Skip", on_click=_decide, disabled=off, args=(*args, "skip", old, source),
                  shortcut=KEYS["skip"], icon=":material/skip_next:", key="rv_skip",
                  width="stretch")


def _export(log, pset) -> None:
    st.divider()
    st.subheader("Decisions")
    stats = log.stats()
    st.caption(f"Log: `{log.path}` · {stats['n_decisions']} decisions on "
               f"{stats['n_patches']} patches by {stats['n_reviewers']} reviewer(s).")
    labels = log.reviewed_labels()
    st.download_button("Export reviewed labels (CSV)", labels.to_csv(index=False),
                       file_name="reviewed_labels.csv", mime="text/csv",
                       icon=":material/download:", disabled=labels.empty, key="rv_export")
    spec = "synthetic" if pset.source.synthetic else str(pset.source.root)
    st.caption("Train with the reviewed labels (relabels applied, flagged patches dropped): "
               f"`python -m model.train --data {spec} --labels-from-review` (it reads this log).")
    hist = log.history()
    if not hist.empty:
        st.dataframe(hist.iloc[::-1].head(20), hide_index=True)


if __name__ == "__main__":
    frame.run_page(render, "Review")
