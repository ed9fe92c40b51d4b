"""The Streamlit viewer, driven headlessly with streamlit.testing.v1.AppTest.

Every page renders without an exception with no runs, with a run, and on bad input; a review
decision made through the UI is in the SQLite log after a rerun and after a new session.
PCAM_LENS_HOME / PCAM_LENS_RUNS point into tmp dirs, so nothing of the user's is touched."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit.testing.v1 as st_testing
from PIL import Image

from model.runs.load import load_run
from model.slides.heatmap import SlideConfig
from model.slides.job import heatmap_job

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "viewer" / "app.py"
PAGES = ["browse", "dataset", "map", "runs", "metrics", "gradcam", "review", "inference",
         "slide"]
NEED_RUN = ["map", "metrics", "gradcam", "review", "inference", "slide"]
RUN_FILES = ["config.json", "best.safetensors", "history.csv", "valid_predictions.csv",
             "metrics.json", "progress.json", "lr_schedule.csv", "valid_ids.csv",
             "train_ids.csv"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_run):  # noqa: F811
    """A runs folder holding a copy of the tiny run (the shared one stays untouched)."""
    root = tmp_path_factory.mktemp("viewer-runs")
    dst = root / "tiny"
    dst.mkdir()
    for name in RUN_FILES:
        if (tiny_run / name).exists():
            shutil.copy2(tiny_run / name, dst / name)
    return root


@pytest.fixture
def env(tmp_path, monkeypatch, runs_root):
    home = tmp_path / "home"
    monkeypatch.setenv("PCAM_LENS_HOME", str(home))
    monkeypatch.setenv("PCAM_LENS_RUNS", str(runs_root))
    return home


def new_app():
    return st_testing.AppTest.from_file(str(APP), default_timeout=240)


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    bugs = [e.value for e in at.error if "Unexpected error" in e.value]
    assert not bugs, bugs


def goto(at, page: str):
    at.switch_page(f"views/{page}.py").run()
    ok(at)
    assert at.title[0].value  # every page has its title
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_every_page_without_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PCAM_LENS_RUNS", str(tmp_path / "no-runs"))
    at = new_app().run()
    ok(at)
    assert "Train a demo model" in [b.label for b in at.sidebar.button]
    for page in PAGES:
        goto(at, page)
        assert "SYNTHETIC DATA" in texts(at.warning), page  # marked synthetic on every page
        if page in NEED_RUN:
            assert "needs a trained run" in texts(at.info), page
    # the synthetic default browses without a run
    goto(at, "browse")
    assert len(at.get("imgs")) >= 48 or len(at.button) >= 48


def test_every_page_with_a_run(env):
    at = new_app().run()
    ok(at)
    assert at.sidebar.selectbox(key="sb_run").value == "tiny"
    assert [b for b in at.button if b.label == "details"]  # the Browse grid
    goto(at, "dataset")
    assert "Checks" in texts(at.subheader)
    goto(at, "runs")
    assert at.dataframe and at.selectbox(key="r_pick").value == "tiny"
    goto(at, "metrics")
    assert at.slider(key="m_thr").value == 0.5
    assert at.segmented_control(key="m_cell").value == "FN"
    at.slider(key="m_thr").set_value(0.3).run()
    ok(at)
    goto(at, "gradcam")
    assert at.selectbox(key="g_layer").value
    at.segmented_control(key="g_mode").set_value("one patch").run()
    ok(at)
    goto(at, "review")
    assert "Confirm label" in [b.label for b in at.button]
    goto(at, "inference")
    assert at.segmented_control(key="i_tta").value == 1


def test_browse_detail_and_filters(env):
    at = new_app().run()
    at.segmented_control(key="b_corr").set_value("incorrect").run()
    ok(at)
    details = [b for b in at.button if b.label == "details"]
    assert details
    details[0].click().run()
    ok(at)
    assert at.selectbox(key="d_layer").value  # the detail dialog with its Grad-CAM
    assert "Augmentation preview" in texts(at.markdown)


def _review_log_path(home: Path) -> Path:
    from model.review.log import fallback_log_path

    return fallback_log_path(None)


def test_review_decision_is_logged_and_survives_a_new_session(env):
    from model.review.log import ReviewLog

    at = new_app().run()
    at.sidebar.text_input(key="sb_reviewer").input("Dr Tester").run()
    goto(at, "review")
    first = at.subheader[0].value
    at.text_input(key="rv_note").input("looks like an artefact").run()
    [b for b in at.button if b.label == "Confirm label"][0].click().run()
    ok(at)
    log = ReviewLog(_review_log_path(env))
    hist = log.history()
    assert len(hist) == 1
    row = hist.iloc[0]
    assert (row["reviewer"], row["action"], row["run"]) == ("Dr Tester", "confirm", "tiny")
    assert f"Patch {row['patch_id']}" == first and row["note"] == "looks like an artefact"
    assert at.subheader[0].value != first  # next patch
    assert at.get("progress")[0].proto.text.startswith("1 of ")  # "n of N reviewed"
    at.run()  # a plain rerun does not record twice
    assert len(log.history()) == 1

    # a new session: the name is remembered, the queue resumes after the reviewed patch
    at2 = new_app().run()
    assert at2.sidebar.text_input(key="sb_reviewer").value == "Dr Tester"
    goto(at2, "review")
    assert at2.subheader[0].value != first
    [b for b in at2.button if b.label == "Skip"][0].click().run()
    ok(at2)
    assert [r for r in ReviewLog(_review_log_path(env)).history()["action"]] == ["confirm",
                                                                                 "skip"]
    assert json.loads((env / "viewer.json").read_text())["reviewer"] == "Dr Tester"


def test_bad_inputs_give_messages_not_tracebacks(env, tmp_path, runs_root):
    at = new_app().run()
    # an empty folder as data source
    empty = tmp_path / "empty"
    empty.mkdir()
    at.sidebar.selectbox(key="sb_kind").set_value("path").run()
    at.sidebar.text_input(key="sb_path").input(str(empty)).run()
    ok(at)
    assert "empty" in texts(at.sidebar.error)
    for page in ("browse", "dataset", "gradcam"):
        goto(at, page)
        assert "No data source" in texts(at.info)
    # a path that does not exist
    at.sidebar.text_input(key="sb_path").input(str(tmp_path / "missing")).run()
    ok(at)
    assert "does not exist" in texts(at.sidebar.error)
    # back to synthetic; a non-image upload on the Inference page
    at.sidebar.selectbox(key="sb_kind").set_value("synthetic").run()
    goto(at, "inference")
    at.segmented_control(key="i_input").set_value("upload").run()
    at.file_uploader(key="i_files").set_value(
        [("notes.png", b"this is not an image", "image/png")]).run()
    [b for b in at.button if b.label.startswith("Predict")][0].click().run()
    ok(at)
    assert "not a readable image" in texts(at.warning)
    assert "None of the uploaded files" in texts(at.error)


def test_deleted_run_weights(env, runs_root):
    broken = runs_root / "broken"
    shutil.copytree(runs_root / "tiny", broken, ignore=shutil.ignore_patterns("*.safetensors"))
    try:
        at = new_app().run()
        at.sidebar.selectbox(key="sb_run").set_value("broken").run()
        ok(at)
        assert "no best.safetensors" in texts(at.sidebar.error)
        for page in ("metrics", "gradcam", "runs"):
            goto(at, page)
        shutil.rmtree(broken)  # the run disappears while the viewer is open
        at.run()
        ok(at)
        assert at.sidebar.selectbox(key="sb_run").value == "tiny"
    finally:
        shutil.rmtree(broken, ignore_errors=True)


def test_kaggle_folder_outliers_and_remembered_source(env, make_kaggle):
    import numpy as np
    from PIL import Image

    root = make_kaggle(n=12)
    Image.fromarray(np.full((96, 96, 3), 2, np.uint8)).save(root / "train" / "black0.tif")
    with open(root / "train_labels.csv", "a") as f:
        f.write("black0,0\n")
    at = new_app().run()
    at.sidebar.selectbox(key="sb_kind").set_value("kaggle").run()
    at.sidebar.text_input(key="sb_path").input(str(root)).run()
    ok(at)
    assert "13 patches" in texts(at.sidebar.caption)
    at.selectbox(key="b_out").set_value("near-black").run()
    [b for b in at.button if b.label == "Run the dataset checks now"][0].click().run()
    ok(at)
    assert "1 patch matches" in texts(at.caption)
    assert [b.help for b in at.button if b.label == "details"] == ["black0"]
    goto(at, "dataset")
    assert "Near-black patches (every pixel below 10): 1" in texts(at.subheader)
    # a new session opens on the same source
    at2 = new_app().run()
    assert at2.sidebar.text_input(key="sb_path").value == str(root)
    assert "13 patches" in texts(at2.sidebar.caption)


@pytest.fixture
def cv_env(tmp_path, monkeypatch, tiny_cv, runs_root):  # noqa: F811
    """A runs folder with the tiny run and a copy of the shared cross-validation."""
    root = tmp_path / "runs"
    shutil.copytree(runs_root, root)
    shutil.copytree(tiny_cv, root / "cv-tiny", ignore=shutil.ignore_patterns("features"))
    home = tmp_path / "home"
    monkeypatch.setenv("PCAM_LENS_HOME", str(home))
    monkeypatch.setenv("PCAM_LENS_RUNS", str(root))
    return root


def _open_cv_data(at, kaggle_sample):
    at.sidebar.selectbox(key="sb_kind").set_value("kaggle").run()
    at.sidebar.text_input(key="sb_path").input(str(kaggle_sample)).run()
    ok(at)


def test_review_queue_over_the_whole_set_with_its_reasons(cv_env, kaggle_sample):
    import pandas as pd

    at = new_app().run()
    _open_cv_data(at, kaggle_sample)
    goto(at, "review")
    assert at.segmented_control(key="rv-which").value == "oof"
    progress = at.get("progress")[0].proto.text
    assert "out-of-fold predictions of all 180 labelled patches" in progress
    assert at.segmented_control(key="rv_order").value == "label_errors"
    shown = at.subheader[0].value.removeprefix("Patch ")
    oof = pd.read_csv(cv_env / "cv-tiny" / "oof_predictions.csv", dtype={"id": str})
    worst = oof.sort_values(["label_issue", "label_quality"], ascending=[False, True]).iloc[0]
    assert shown == worst["id"]  # the queue starts at confident learning's first pick
    md = texts(at.markdown)
    assert "Why it is here" in md and f"{worst['label_quality']:.3f}" in md
    assert "TTA views" in md
    at.segmented_control(key="rv_order").set_value("spread").run()
    ok(at)
    assert at.subheader[0].value == f"Patch {oof.loc[oof['tta_spread'].idxmax(), 'id']}"


def test_browse_uses_out_of_fold_predictions(cv_env, kaggle_sample):
    at = new_app().run()
    _open_cv_data(at, kaggle_sample)
    assert "out-of-fold predictions of all 180 labelled patches" in texts(at.caption)
    assert "label quality (lowest first)" in at.selectbox(key="b_sort").options
    at.selectbox(key="b_sort").set_value("label quality (lowest first)").run()
    ok(at)
    [b for b in at.button if b.label == "details"][0].click().run()
    ok(at)
    assert "Why it is here" in texts(at.markdown)


@pytest.mark.slow
def test_map_page_computes_embeddings_and_shows_similar_patches(env, make_kaggle):
    root = make_kaggle(n=30)
    at = new_app().run()
    at.sidebar.selectbox(key="sb_kind").set_value("kaggle").run()
    at.sidebar.text_input(key="sb_path").input(str(root)).run()
    goto(at, "map")
    assert "needs the run's embeddings of all 30 patches" in texts(at.info)
    [b for b in at.button if b.label == "Compute the embeddings"][0].click().run()
    ok(at)
    for _ in range(240):  # a background `python -m model.embed`: rerun until it is there
        if any(s.key == "map_colour" for s in at.selectbox):
            break
        time.sleep(0.5)
        at.run()
    ok(at)
    at.segmented_control(key="map_method").set_value("pca").run()
    ok(at)
    for colour in ("label", "probability", "review status", "data split"):
        at.selectbox(key="map_colour").set_value(colour).run()
        ok(at)
    charts = at.get("plotly_chart")
    assert charts, "no map drawn"
    fig = charts[0].proto.spec
    assert "scattergl" in fig and fig.count('"customdata"') >= 1
    # the Dataset page finds duplicates with the run's embeddings
    goto(at, "dataset")
    [b for b in at.button if b.label == "Find duplicates"][0].click().run()
    ok(at)
    assert "0 groups of exact duplicates" in texts(at.text)
    assert "pairs split across the run's train/validation" in texts(at.text)
    # the Browse detail now lists the most similar patches
    goto(at, "browse")
    [b for b in at.button if b.label == "details"][0].click().run()
    ok(at)
    assert "Most similar patches" in texts(at.markdown)


def test_slide_page_shows_a_finished_heatmap(env, runs_root, patch_files, tmp_path):
    """The Slide page finds the heatmap computed for this run and slide (as model.slide
    writes it) and draws the summary and the slide; without one it offers to compute it."""
    tiles = [np.asarray(Image.open(p).convert("RGB")) for _, _, p in patch_files[:9]]
    mosaic = np.concatenate([np.concatenate(tiles[r * 3:r * 3 + 3], axis=1) for r in range(3)])
    path = tmp_path / "mosaic.png"
    Image.fromarray(mosaic).save(path)
    at = new_app().run()
    goto(at, "slide")
    at.segmented_control(key="sl_kind").set_value("file").run()
    at.text_input(key="sl_path").input(str(path)).run()
    at.number_input(key="sl_mpp").set_value(0.972).run()
    ok(at)
    assert "No heatmap of mosaic.png" in texts(at.info)
    assert "Compute the heatmap" in [b.label for b in at.button]
    heatmap_job(load_run(runs_root / "tiny"), path, SlideConfig(mpp=0.972), progress=False)
    at.run()
    ok(at)
    assert "Tiles run" in [m.label for m in at.metric]
    spec = at.get("plotly_chart")[0].proto.spec
    assert "scattergl" in spec and "data:image/png;base64" in spec.replace("\\u002f", "/")


def test_inference_page_says_which_engine_ran(env, kaggle_sample):
    at = new_app().run()
    goto(at, "inference")
    at.text_input(key="i_path").set_value(str(kaggle_sample)).run()
    [b for b in at.button if b.label.startswith("Predict 29")][0].click().run()
    ok(at)
    engine = [c.value for c in at.caption if c.value.startswith("Engine: ")]
    assert engine and "29 forward passes < 20,000" in engine[0], texts(at.caption)
