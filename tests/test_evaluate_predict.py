"""Tests for model/evaluation/evaluate.py and model/evaluation/predict.py on a tiny trained run."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model import evaluate, predict
from model.core.errors import DataError
from model.data.open import open_source
from model.evaluation.evaluate import evaluate_run
from model.runs.format import default_out_dir, default_submission_path

ROOT = Path(__file__).resolve().parents[1]

SYNTH_TEST = "synthetic:n=23,seed=5"  # 23 patches: shards of 12 and 11


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "valid"
    return evaluate_run(tiny_run, out=out, n_boot=200, progress=False)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_files_exist_and_parse(evaluated, tiny_run):
    out = evaluated.out_dir
    for name in ("metrics.json", "predictions.csv", "roc.csv", "pr.csv", "calibration.csv",
                 "samples.csv"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("auc", "auc_ci", "accuracy", "n", "run", "checkpoint", "data", "tta",
                "synthetic"):
        assert key in m, key
    assert m["synthetic"] is True and m["tta"] == 1 and m["checkpoint"] == "best"
    assert m["run"] == tiny_run.name
    pred = pd.read_csv(out / "predictions.csv", dtype={"id": str})
    assert list(pred.columns) == ["id", "label", "prob", "loss", "pred", "correct"]
    valid = pd.read_csv(tiny_run / "valid_ids.csv", dtype={"id": str})
    assert list(pred["id"]) == list(valid["id"])
    assert list(pred["label"]) == list(valid["label"])
    assert m["n"] == len(valid)
    assert list(pd.read_csv(out / "roc.csv").columns) == ["fpr", "tpr", "threshold"]
    assert list(pd.read_csv(out / "pr.csv").columns) == ["recall", "precision", "threshold"]
    cal = pd.read_csv(out / "calibration.csv")
    assert len(cal) == 10 and cal["count"].sum() == len(valid)
    samples = pd.read_csv(out / "samples.csv", dtype={"id": str})
    assert list(samples.columns) == ["set", "id", "label", "prob", "loss"]
    assert set(samples["set"]) <= {"top_losses", "confident_correct", "uncertain",
                                   "false_negatives", "random"}
    assert samples.groupby("set").size().max() <= 16
    assert _no_temp_files(out)


def test_evaluate_numbers_agree_with_sklearn(evaluated):
    from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

    pred = pd.read_csv(evaluated.out_dir / "predictions.csv", dtype={"id": str})
    m = json.loads((evaluated.out_dir / "metrics.json").read_text())
    y, p = pred["label"].to_numpy(), pred["prob"].to_numpy()
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred["pred"]), abs=1e-12)
    assert (pred["pred"] == (p >= 0.5)).all()
    assert (pred["correct"] == (pred["pred"] == y)).all()
    tn, fp, fn, tp = confusion_matrix(y, pred["pred"], labels=[0, 1]).ravel()
    c = m["confusion"]
    assert (c["tn"], c["fp"], c["fn"], c["tp"]) == (tn, fp, fn, tp)
    lo, hi = m["auc_ci"]
    assert 0 <= lo <= hi <= 1
    # the losses are the binary cross-entropy of each row
    q = np.clip(p, 1e-7, 1 - 1e-7)
    np.testing.assert_allclose(pred["loss"], -(y * np.log(q) + (1 - y) * np.log1p(-q)),
                               atol=1e-9)


def test_evaluate_probs_match_predict_probs(evaluated, tiny_loaded, tiny_run):
    """evaluate re-runs inference: its probabilities are the run's model on the same rows."""
    from model.evaluation.inference import predict_probs

    cfg = json.loads((tiny_run / "config.json").read_text())
    from model.data.open import reopen_source

    src = reopen_source(cfg["data"])
    idx = [src.index_of(i) for i in evaluated.predictions["id"][:8]]
    p = predict_probs(tiny_loaded, src, indices=idx, progress=False)
    np.testing.assert_allclose(evaluated.predictions["prob"][:8], p, atol=1e-6)


def test_evaluate_other_labelled_data_and_default_out(tiny_run, tmp_path):
    res = evaluate_run(tiny_run, "synthetic:n=30,seed=3", n_boot=50, progress=False, tta=2,
                       out=tmp_path / "o")
    assert res.metrics["n"] == 30 and res.metrics["tta"] == 2
    assert default_out_dir(tiny_run, "synthetic:n=30,seed=3") == \
        tiny_run / "eval" / "synthetic_n_30_seed_3"
    assert default_out_dir(tiny_run, None) == tiny_run / "eval" / "valid"
    assert default_out_dir(tiny_run, "/x/valid") == tiny_run / "eval" / "data-valid"


def test_evaluate_unlabelled_data_is_refused(tiny_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            folder / f"p{k}.png")
    with pytest.raises(DataError, match="model.predict"):
        evaluate_run(tiny_run, folder, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_evaluate_cli_report(tiny_run, tmp_path, capsys):
    rc = evaluate.main([str(tiny_run), "--out", str(tmp_path / "e"), "--n-boot", "50",
                        "--no-progress", "--threshold", "0.4"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("ROC AUC", "95% CI", "accuracy", "label 0", "label 1", "sensitivity >= 0.95",
                 "ECE", "SYNTHETIC", str(tmp_path / "e")):
        assert text in out, text
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["threshold"] == 0.4 and m["tta"] == 8  # the CLI averages the 8 dihedral views
    cli = pd.read_csv(tmp_path / "e" / "predictions.csv", dtype={"id": str})
    lib = evaluate_run(tiny_run, out=tmp_path / "lib", n_boot=10, progress=False, tta=8)
    assert lib.metrics["auc"] == m["auc"]
    np.testing.assert_array_equal(
        cli["prob"].to_numpy(), pd.read_csv(tmp_path / "lib" / "predictions.csv")["prob"])


def test_evaluate_cli_bad_run_dir(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert evaluate.main([str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow  # starts Python subprocesses (torch import each)
def test_evaluate_cli_subprocess_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "model.evaluate", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_evaluate_cli_bad_tta(tiny_run, capsys):
    assert evaluate.main([str(tiny_run), "--tta", "9", "--no-progress"]) == 2
    assert "tta" in capsys.readouterr().err


# --------------------------------------------------------------------------- predict


def test_predict_real_test_folder(tiny_run, kaggle_sample, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    rc = predict.main([str(tiny_run), "--data", str(kaggle_sample), "--out", str(out),
                       "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "mean P(tumour)" in printed
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    with open(kaggle_sample / "sample_submission.csv", newline="") as f:
        want = [r["id"] for r in csv.DictReader(f)]
    assert [r[0] for r in rows[1:]] == want
    probs = np.array([float(r[1]) for r in rows[1:]])
    assert ((probs >= 0) & (probs <= 1)).all()
    assert _no_temp_files(tmp_path)


def test_predict_default_out(tiny_run):
    assert default_submission_path(tiny_run, "/d/pcam-sample") == \
        tiny_run / "predictions" / "pcam-sample-submission.csv"
    assert default_submission_path(tiny_run, "/d/pcam-sample", (1, 4)).name == \
        "pcam-sample-submission.part1of4.csv"


def _predict(run, out, *extra):
    return predict.main([str(run), "--data", SYNTH_TEST, "--out", str(out), "--no-progress",
                         "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def sharded(tiny_run, tmp_path_factory):
    """Unsharded prediction and two shard parts of SYNTH_TEST. Batch size 4 with shards of 12
    and 11 keeps every batch the same as in the unsharded run, so results match exactly."""
    d = tmp_path_factory.mktemp("shards")
    assert _predict(tiny_run, d / "full.csv") == 0
    assert _predict(tiny_run, d / "part0.csv", "--shard", "0/2") == 0
    assert _predict(tiny_run, d / "part1.csv", "--shard", "1/2") == 0
    return d


def test_shard_parts_have_index(sharded):
    p0 = pd.read_csv(sharded / "part0.csv")
    p1 = pd.read_csv(sharded / "part1.csv")
    assert list(p0.columns) == ["id", "label", "index"]
    assert list(p0["index"]) == list(range(12)) and list(p1["index"]) == list(range(12, 23))


def test_sharded_merge_equals_unsharded(sharded, capsys):
    merged = sharded / "merged.csv"
    rc = predict.main(["--merge", str(sharded / "part1.csv"), str(sharded / "part0.csv"),
                       "--data", SYNTH_TEST, "--out", str(merged)])
    assert rc == 0, capsys.readouterr().err
    assert merged.read_bytes() == (sharded / "full.csv").read_bytes()
    full = pd.read_csv(sharded / "full.csv")
    assert list(full["id"]) == open_source(SYNTH_TEST, "test").ids


def test_merge_with_missing_part_names_missing_ids(sharded, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    rc = predict.main(["--merge", str(sharded / "part0.csv"), "--data", SYNTH_TEST,
                       "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "Traceback" not in err
    ids = open_source(SYNTH_TEST, "test").ids
    assert "11 of 23 ids are missing" in err
    assert ids[12] in err and ids[21] in err and ids[0] not in err
    assert "12-22" in err
    assert not out.exists() and _no_temp_files(tmp_path)


def test_merge_with_duplicate_part_names_duplicates(sharded, tmp_path, capsys):
    rc = predict.main(["--merge", str(sharded / "part0.csv"), str(sharded / "part0.csv"),
                       str(sharded / "part1.csv"), "--data", SYNTH_TEST,
                       "--out", str(tmp_path / "sub.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "more than once" in err
    assert open_source(SYNTH_TEST, "test").ids[0] in err
    assert not (tmp_path / "sub.csv").exists()


def test_merge_against_other_data_is_refused(sharded, tmp_path, capsys):
    rc = predict.main(["--merge", str(sharded / "part0.csv"), str(sharded / "part1.csv"),
                       "--data", "synthetic:n=23,seed=6", "--out", str(tmp_path / "s.csv")])
    assert rc == 2 and "do not match" in capsys.readouterr().err


def test_bad_shard_spec(tiny_run, tmp_path, capsys):
    assert _predict(tiny_run, tmp_path / "x.csv", "--shard", "2/2") == 2
    assert _predict(tiny_run, tmp_path / "x.csv", "--shard", "a/b") == 2
    assert "RANK/WORLD" in capsys.readouterr().err


def test_interrupted_prediction_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt after the first batch of the hot loop: no submission, no temp file,
    and an existing submission is left as it was."""
    import model.evaluation.inference as inf

    real_update = inf._Progress.update

    def update(self, k):
        real_update(self, k)
        raise KeyboardInterrupt

    monkeypatch.setattr(inf._Progress, "update", update)
    out = tmp_path / "preds" / "submission.csv"
    assert _predict(tiny_run, out) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and _no_temp_files(tmp_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("id,label\nold,0.5\n")
    assert _predict(tiny_run, out) == 130
    assert out.read_text() == "id,label\nold,0.5\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]


def test_predict_cli_errors(tmp_path, capsys):
    assert predict.main([str(tmp_path / "norun"), "--data", SYNTH_TEST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert predict.main(["--data", SYNTH_TEST]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_predict_broken_image_is_one_clean_error(tiny_run, tmp_path, capsys):
    """A broken file decoded in a loader worker process still gives one 'error:' line."""
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            folder / f"p{k}.png")
    (folder / "p4.png").write_bytes(b"not a png")
    rc = predict.main([str(tiny_run), "--data", str(folder), "--out", str(tmp_path / "s.csv"),
                       "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "p4.png" in err
    assert "Traceback" not in err and "Caught" not in err and err.count("\n") == 1
    assert not (tmp_path / "s.csv").exists()
