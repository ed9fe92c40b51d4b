"""pcam-lens viewer entry point: `streamlit run viewer/app.py` from the repository root.

The sidebar chooses the data source, split, run and reviewer (remembered across restarts in
viewer.json, see viewer.state.settings_path); st.navigation runs one page of viewer/views/.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # streamlit puts only viewer/ on sys.path
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from model.core.errors import PcamLensError  # noqa: E402
from model.core.runtime import quiet_known_warnings  # noqa: E402
from model.runs.format import list_runs  # noqa: E402
from model.runs.summary import summarize_run  # noqa: E402
from viewer import state, training  # noqa: E402

# No model.core.runtime.tune_allocator() here: the viewer is a long-lived process whose resident
# memory matters more than the speed of its small batches; training runs in a subprocess.
quiet_known_warnings()

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = [("browse.py", "Browse", ":material/grid_view:"),
         ("dataset.py", "Dataset", ":material/dataset:"),
         ("map.py", "Map", ":material/scatter_plot:"),
         ("runs.py", "Runs", ":material/monitoring:"),
         ("metrics.py", "Metrics", ":material/analytics:"),
         ("gradcam.py", "Grad-CAM", ":material/local_fire_department:"),
         ("review.py", "Review", ":material/rate_review:"),
         ("inference.py", "Inference", ":material/batch_prediction:"),
         ("slide.py", "Slide", ":material/biotech:")]
SPLITS = ["train", "test"]


def _init(ss) -> None:
    """Seed the sidebar widgets from the settings file, once per session (and again for a
    widget Streamlit dropped because it was not drawn in the last run)."""
    if "_settings" not in ss:
        ss["_settings"] = state.load_settings()
    s = ss["_settings"]
    seeds = {"sb_kind": s["source_kind"] if s["source_kind"] in state.SOURCE_KINDS
             else "synthetic", "sb_path": s["path"] or "",
             "sb_split": s["split"] if s["split"] in SPLITS else "train",
             "sb_runs_root": s["runs_root"] or "", "sb_checkpoint": s["checkpoint"]
             if s["checkpoint"] in ("best", "last") else "best",
             "sb_reviewer": s["reviewer"] or ""}
    for k, v in seeds.items():
        if k not in ss:
            ss[k] = v


def _source(c: state.Context, ss) -> None:
    st.subheader("Data")
    kind = st.selectbox("Data source", list(state.SOURCE_KINDS), key="sb_kind",
                        format_func=state.SOURCE_KINDS.get)
    if kind != "synthetic":
        st.text_input("Path", key="sb_path", placeholder="/data/histopathologic-cancer-detection",
                      help="A Kaggle folder (train/, train_labels.csv, test/), a folder of PCam "
                           ".h5 files or one _x.h5 file, class folders, or a flat image folder.")
    st.segmented_control("Split", SPLITS, key="sb_split", required=True,
                         help="train = labelled patches; test = unlabelled ones to predict.")
    try:
        spec = state.source_spec(kind, ss.get("sb_path", ""))
        c.src_key = state.source_key(spec, ss["sb_split"] or "train")
        c.source = state.open_source_cached(c.src_key)
        warning = state.check_kind(kind, c.source)
        if warning:
            st.warning(warning)
        st.caption(c.source.describe_short())
    except PcamLensError as e:
        c.source, c.src_key, c.source_error = None, None, str(e)
        st.error(str(e))


def _run(c: state.Context, ss) -> None:
    st.subheader("Model")
    root = state.runs_root({"runs_root": ss["sb_runs_root"]})
    c.runs_root = root
    c.runs = [summarize_run(p) for p in _list_runs(root)]
    names = [r.name for r in c.runs]
    labels = {r.name: r.label for r in c.runs}
    wanted = ss.pop("_select_run", None) or ss.get("sb_run") or ss["_settings"].get("run")
    if names:
        if wanted not in names:
            if wanted and "sb_run" not in ss:
                st.caption(f"The remembered run {wanted} no longer exists.")
            wanted = names[0]
        ss["sb_run"] = wanted
        name = st.selectbox("Run", names, key="sb_run", format_func=labels.get,
                            help=f"Runs under {root} (newest first).")
        c.run_dir = root / name
        try:
            c.run_key = state.run_key(c.run_dir, ss["sb_checkpoint"])
        except PcamLensError as e:
            c.run_error = str(e)
            st.error(str(e))
    else:
        ss.pop("sb_run", None)
        st.info(f"No trained runs under `{root}` yet.")
        if c.source is not None and c.source.labelled and not training.has_jobs():
            training.demo_button(c.src_key.spec, root)
    if training.has_jobs():
        training.progress_panel()
    with st.expander("Settings"):
        st.text_input("Runs folder", key="sb_runs_root", placeholder=str(root),
                      help="Empty = $PCAM_LENS_RUNS or ./runs")
        st.segmented_control("Checkpoint", ["best", "last"], key="sb_checkpoint", required=True)
        if names and not training.has_jobs() and c.source is not None and c.source.labelled:
            training.demo_button(c.src_key.spec, root, key="demo-more")


def _list_runs(root: Path) -> list[Path]:
    try:
        return list_runs(root)
    except OSError:
        return []


def sidebar() -> state.Context:
    ss = st.session_state
    _init(ss)
    c = state.Context(settings=ss["_settings"])
    with st.sidebar:
        for k in ("_flash", "_flash_error"):
            if k in ss:
                (st.success if k == "_flash" else st.error)(ss.pop(k))
        _source(c, ss)
        _run(c, ss)
        st.subheader("Review")
        c.reviewer = st.text_input("Reviewer name", key="sb_reviewer",
                                   help="Recorded with each review decision. This is a name, "
                                        "not authentication.").strip()
    new = {"source_kind": ss["sb_kind"], "path": ss.get("sb_path", "") or "",
           "split": ss["sb_split"] or "train", "run": ss.get("sb_run"),
           "runs_root": ss["sb_runs_root"] or None, "checkpoint": ss["sb_checkpoint"] or "best",
           "reviewer": ss["sb_reviewer"]}
    if new != ss["_settings"]:
        err = state.save_settings(new)
        if err:
            st.sidebar.warning(err)
        ss["_settings"] = new
        c.settings = new
    return c


def main() -> None:
    st.set_page_config(page_title="pcam-lens", page_icon=":material/biotech:", layout="wide")
    nav = st.navigation([st.Page(VIEWS / f, title=t, icon=i, url_path=f[:-3], default=k == 0)
                         for k, (f, t, i) in enumerate(PAGES)])
    st.session_state["_ctx"] = sidebar()
    nav.run()


main()
