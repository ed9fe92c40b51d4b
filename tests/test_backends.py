"""Inference backends (model.evaluation.inference BACKENDS): ONNX Runtime against fp32 eager
PyTorch on real patches, the exported model reused, the fallback to eager with a note."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from model import predict as predict_cli
from model.core.errors import PcamLensError
from model.data.open import open_source
from model.evaluation import engine, onnx_backend
from model.evaluation.embeddings import embed_run
from model.evaluation.evaluate import evaluate_run
from model.evaluation.features import cached_features
from model.evaluation.inference import predict_probs
from model.evaluation.predict import metadata_path
from model.runs.load import load_run
from model.train import export_after_training


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """The shared tiny run copied: the ONNX export is written into the run's engine/."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return load_run(dst)


@pytest.mark.slow
def test_onnx_runtime_matches_fp32_eager_on_real_patches(run_copy, kaggle_sample):
    src = open_source(kaggle_sample, "train").subset(np.arange(300))
    eager = predict_probs(run_copy, src, precision="fp32", progress=False)
    ort = predict_probs(run_copy, src, precision="fp32", progress=False, backend="onnx")
    assert np.abs(ort - eager).max() < 1e-4  # the same network, another kernel library
    y = src.labels
    assert abs(roc_auc_score(y, ort) - roc_auc_score(y, eager)) < 0.002
    path = onnx_backend.model_path(run_copy)
    assert path.is_file() and path.parent == run_copy.run_dir / "engine"
    mtime = path.stat().st_mtime_ns
    again = onnx_backend.OnnxModel(run_copy, 2)
    assert not again.exported and path.stat().st_mtime_ns == mtime  # exported once, reused
    tta = predict_probs(run_copy, src.subset(np.arange(20)), tta=8, precision="fp32",
                        progress=False, backend="onnx")
    ref = predict_probs(run_copy, src.subset(np.arange(20)), tta=8, precision="fp32",
                        progress=False)
    assert np.abs(tta - ref).max() < 1e-4  # the views go through it too


def test_a_backend_that_cannot_run_falls_back_to_eager_with_a_note(run_copy, kaggle_sample,
                                                                   monkeypatch, capsys):
    src = open_source(kaggle_sample, "train").subset(np.arange(16))
    eager = predict_probs(run_copy, src, precision="fp32", progress=False)

    def broken(*a, **k):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(onnx_backend, "OnnxModel", broken)
    got = predict_probs(run_copy, src, precision="fp32", progress=False, backend="onnx")
    np.testing.assert_array_equal(got, eager)  # eager's own answer, not a wrong one
    assert "note: ONNX Runtime backend unavailable (ImportError" in capsys.readouterr().err
    choice = engine.build_engine(run_copy, backend="onnx", precision="fp32").choice
    assert choice.backend == "eager" and "could not be built" in choice.why  # and says so
    with pytest.raises(PcamLensError, match="Unknown inference backend"):
        predict_probs(run_copy, src, progress=False, backend="tensorrt")


def test_auto_keeps_a_small_job_eager_and_takes_onnx_for_a_large_one(run_copy, kaggle_sample,
                                                                       monkeypatch):
    src = open_source(kaggle_sample, "train").subset(np.arange(8))
    built = []
    monkeypatch.setattr(onnx_backend, "onnx_model", lambda loaded, t, **k: built.append(1))
    predict_probs(run_copy, src, precision="fp32", progress=False, backend="auto")
    assert not built  # 8 patches: the export would cost more than it saves
    monkeypatch.setattr(engine, "AUTO_ONNX_MIN", 8)
    predict_probs(run_copy, src, precision="fp32", progress=False, backend="auto")
    assert built == [1]  # large enough (the spy returns None: eager ran, as on a failure)
    built.clear()
    predict_probs(run_copy, src, precision="bf16", progress=False, backend="auto")
    assert not built  # bf16 autocast is eager PyTorch's; ONNX Runtime here is fp32


def test_every_prediction_output_records_the_engine_that_ran(run_copy, kaggle_sample,
                                                             tmp_path):
    out = tmp_path / "submission.csv"
    assert predict_cli.main([str(run_copy.run_dir), "--data", str(kaggle_sample), "--tta", "1",
                             "--out", str(out), "--no-progress"]) == 0
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["id", "label"]  # the CSV stays Kaggle's
    rec = json.loads(metadata_path(out).read_text())
    assert rec["n"] == len(sub) == 29 and rec["tta"] == 1 and rec["seconds"] >= 0
    e = rec["engine"]
    assert (e["backend"], e["requested"]) == ("eager", "auto")
    assert e["why"].startswith("auto: 29 forward passes < 20,000")
    assert e["device"] == "cpu" and e["precision"] in ("fp32", "bf16") and e["threads"] >= 1
    res = evaluate_run(run_copy.run_dir, out=tmp_path / "eval", progress=False, n_boot=10,
                       backend="eager")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["engine"] == res.metrics["engine"]
    assert written["engine"]["backend"] == "eager" and written["engine"]["why"] == \
        "asked for eager"


@pytest.mark.slow  # exports the network (~15 s)
def test_an_existing_export_runs_without_building_the_pytorch_network(run_copy,
                                                                      kaggle_sample):
    src = open_source(kaggle_sample, "test")
    ref = predict_probs(run_copy, src, precision="fp32", progress=False)
    logged = []
    export_after_training(run_copy.run_dir, "auto", 5.0, log=logged.append)
    assert not logged and not (run_copy.run_dir / "engine").exists()  # short training: none
    export_after_training(run_copy.run_dir, "onnx", 5.0, log=logged.append)
    assert logged[0].startswith("Inference graph: ") and onnx_backend.model_path(
        run_copy).is_file()
    lazy = load_run(run_copy.run_dir, lazy=True)
    eng = engine.build_engine(lazy, backend="auto", passes=len(src))
    assert eng.choice.backend == "onnxruntime" and "export exists" in eng.choice.why
    assert eng.choice.artifact == str(onnx_backend.model_path(run_copy))
    got = predict_probs(lazy, src, progress=False, engine=eng)
    assert not lazy.model_built  # start-up without fastai, timm or the weights
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow  # exports the features graph (~15 s)
def test_embedding_features_through_onnx_runtime_match_eager_and_say_so(run_copy,
                                                                        kaggle_sample,
                                                                        tmp_path):
    src = open_source(kaggle_sample, "train").subset(np.arange(200))
    eager = cached_features(run_copy.model, run_copy.input, src, tmp_path / "eager", views=2,
                            precision="fp32", progress=False)
    emb = embed_run(run_copy, src, views=2, progress=False, backend="onnx")
    assert emb.meta["engine"]["backend"] == "onnxruntime"
    assert Path(emb.meta["engine"]["artifact"]).name.startswith("features-")
    ort = np.memmap(next(emb.dir.parent.glob("features-*.f16")), dtype=np.float16, mode="r",
                    shape=eager.shape)
    np.testing.assert_allclose(np.asarray(ort, np.float32), np.asarray(eager, np.float32),
                               rtol=2e-3, atol=2e-3)  # float16 storage of the same features
