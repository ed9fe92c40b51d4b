"""Cross-validation (model.crossval): folds, fold runs, out-of-fold predictions, label issues,
the fold ensemble, the review queue over the whole set, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_crossval import TINY_CV_K, TINY_CV_N, tiny_cv_config

from model.core.errors import DataError, PcamLensError, RunError
from model.crossval import main as crossval_main
from model.data.open import open_source
from model.data.splits import fold_assignment
from model.evaluation import label_issues as li
from model.evaluation.ensemble import load_ensemble, predict_ensemble
from model.evaluation.evaluate import evaluate_run
from model.evaluation.features import cached_features
from model.evaluation.inference import predict_probs
from model.evaluation.predict import predict_source
from model.nets.archs import build_model
from model.nets.transforms import InputConfig, dihedral, dihedral_views
from model.oof.crossval import resume_crossval, run_crossval
from model.oof.queue import build_queue
from model.queue import main as queue_main
from model.review.log import ReviewLog, review_queue
from model.runs.crossval import open_crossval, read_oof
from model.runs.load import load_run

REPO = Path(__file__).resolve().parents[1]


def _ids(path: Path) -> list[str]:
    return list(pd.read_csv(path, dtype={"id": str})["id"])


# --------------------------------------------------------------------------- folds


def test_every_id_is_held_out_once_and_no_fold_model_saw_its_own(tiny_cv):
    folds = pd.read_csv(tiny_cv / "folds.csv", dtype={"id": str})
    assert len(folds) == TINY_CV_N and folds["id"].is_unique
    held = []
    for k in range(TINY_CV_K):
        d = tiny_cv / f"fold-{k}"
        valid, train = _ids(d / "valid_ids.csv"), _ids(d / "train_ids.csv")
        assert set(valid).isdisjoint(train)  # checked from the fold's own run directory
        assert set(valid) == set(folds.loc[folds["fold"] == k, "id"])
        assert set(valid) | set(train) == set(folds["id"])
        held += valid
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["crossval"]["fold"] == k and cfg["split"]["n_valid"] == len(valid)
    assert sorted(held) == sorted(folds["id"])  # exactly one held-out fold each
    # stratified: each fold's tumour fraction is close to the whole set's
    frac = folds["label"].mean()
    assert all(abs(g["label"].mean() - frac) < 0.05 for _, g in folds.groupby("fold"))


def test_oof_file_columns_and_values(tiny_cv):
    cv = open_crossval(tiny_cv)
    oof = read_oof(cv, open_source(cv.config["data"]["path"], "train"))
    assert len(oof) == TINY_CV_N
    views = oof[[f"p_view{v}" for v in range(8)]].to_numpy()
    assert np.allclose(oof["prob"], views.mean(1))
    assert np.allclose(oof["tta_spread"], views.std(1))
    assert oof["issue_rank"].sort_values().tolist() == list(range(1, TINY_CV_N + 1))
    assert oof["label_quality"].between(0, 1).all()
    m = cv.metrics
    assert len(m["fold_auc"]) == TINY_CV_K and 0 <= m["oof_auc"] <= 1
    assert m["oof_auc_ci"][0] <= m["oof_auc"] <= m["oof_auc_ci"][1]


def test_oof_equals_the_fold_runs_own_forward_pass(tiny_cv, kaggle_sample):
    """The OOF probability of a patch (head on cached float16 features) is what the fold's
    run directory predicts for it with 8-view TTA through the ordinary inference path."""
    oof = pd.read_csv(tiny_cv / "oof_predictions.csv", dtype={"id": str})
    src = open_source(kaggle_sample, "train")
    for k in range(TINY_CV_K):
        rows = oof[oof["fold"] == k].head(20)
        p = predict_probs(load_run(tiny_cv / f"fold-{k}"), src, tta=8, progress=False,
                          indices=[src.index_of(i) for i in rows["id"]], per_view=True,
                          precision="fp32")
        want = rows[[f"p_view{v}" for v in range(8)]].to_numpy()
        assert np.abs(p - want).max() < 2e-3  # float16 features
        assert np.abs(p.mean(1) - rows["prob"].to_numpy()).max() < 1e-3


@pytest.mark.slow
def test_grouped_folds_never_split_a_slide(h5_sample, tmp_path):
    """The HDF5 sample with a meta file (written here) giving slide ids: every slide's
    patches share one fold, and the fold runs keep slides on one side."""
    data = tmp_path / "h5"
    data.mkdir()
    for f in h5_sample.iterdir():
        os.symlink(f, data / f.name)
    n = len(open_source(data, "train"))
    rng = np.random.default_rng(0)
    slides = [f"slide_{i:02d}" for i in rng.integers(0, 24, n)]
    pd.DataFrame({"wsi": slides, "coord_x": 0, "coord_y": 0, "tumor_patch": False}).to_csv(
        data / "camelyonpatch_level_2_split_valid_meta.csv")
    src = open_source(data, "train")
    assert src.groups is not None
    fold = fold_assignment(src.labels, 4, 0, src.groups)
    per_slide = pd.DataFrame({"g": src.groups, "f": fold}).groupby("g")["f"].nunique()
    assert (per_slide == 1).all()
    cfg = tiny_cv_config(data, tmp_path / "cv")
    cfg.train.data.max_items = None
    cv = run_crossval(cfg, log=lambda *_: None)
    folds = pd.read_csv(cv / "folds.csv", dtype={"id": str, "group": str})
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert json.loads((cv / "cv.json").read_text())["fold_method"] == "grouped by slide"
    for k in range(TINY_CV_K):
        tr = set(folds.set_index("id").loc[_ids(cv / f"fold-{k}" / "train_ids.csv"), "group"])
        va = set(folds.set_index("id").loc[_ids(cv / f"fold-{k}" / "valid_ids.csv"), "group"])
        assert tr.isdisjoint(va)


# --------------------------------------------------------------------------- features


def test_feature_cache_resumes_and_is_keyed(kaggle_sample, tmp_path, monkeypatch):
    import model.evaluation.features as F

    src = open_source(kaggle_sample, "train").subset(np.arange(60))
    torch.manual_seed(0)
    model, _ = build_model("test_efficientnet", 2)
    model.eval()
    icfg = InputConfig(patch=96, crop=96, size=96, mean=[0.5] * 3, std=[0.25] * 3)
    full = np.array(cached_features(model, icfg, src, tmp_path / "a", batch_size=16,
                                    progress=False))
    monkeypatch.setattr(F, "CHUNK_ROWS", 16)

    def boom(done, total):
        if done >= 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_features(model, icfg, src, tmp_path / "b", batch_size=16, progress=boom)
    meta = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert 0 < meta["rows_done"] < 60 and not meta["complete"]
    seen = []
    again = cached_features(model, icfg, src, tmp_path / "b", batch_size=16,
                            progress=lambda d, t: seen.append(d))
    assert seen[0] > 16  # resumed after the committed rows, not from 0
    assert np.array_equal(np.asarray(again), full)
    # other ids -> another cache file; the first one is untouched
    other = src.subset(np.arange(30))
    cached_features(model, icfg, other, tmp_path / "b", batch_size=16, progress=False)
    assert len(list((tmp_path / "b").glob("*.f16"))) == 2


def test_dihedral_views_match_the_tta_views(kaggle_sample):
    x = open_source(kaggle_sample, "train").read(0)
    t = torch.from_numpy(x.copy()).permute(2, 0, 1)
    for k, v in enumerate(dihedral_views(x)):
        assert np.array_equal(v, dihedral(t, k).permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------- ensemble


def test_ensemble_is_the_mean_of_its_members(tiny_cv, kaggle_sample, tmp_path):
    ens = load_ensemble(tiny_cv)
    assert len(ens.members) == TINY_CV_K
    src = open_source(kaggle_sample, "test")
    mean, members = predict_ensemble(ens, src, progress=False, precision="fp32")
    for k, m in enumerate(ens.members):
        assert np.allclose(members[:, k], predict_probs(m, src, progress=False,
                                                        precision="fp32"))
    assert np.allclose(mean, members.mean(1))
    # model.predict on a cross-validation directory: the same mean, in submission form
    _, _, sub, _ = predict_source(tiny_cv, str(kaggle_sample), progress=False, precision="fp32")
    assert list(sub["id"]) == list(src.ids) and np.allclose(sub["label"], mean)
    # model.evaluate on a cross-validation directory: the ensemble, with member AUCs, on a
    # small labelled folder (60 patches of the sample; train/ is a link)
    small = tmp_path / "small"
    small.mkdir()
    os.symlink(kaggle_sample / "train", small / "train")
    labels = pd.read_csv(kaggle_sample / "train_labels.csv", dtype={"id": str})
    labels.sort_values("id").head(60).to_csv(small / "train_labels.csv", index=False)
    res = evaluate_run(tiny_cv, data=str(small), out=tmp_path / "ev", progress=False,
                       n_boot=50, precision="fp32")
    e = res.metrics["ensemble"]
    assert e["members"] == TINY_CV_K and len(e["member_auc"]) == TINY_CV_K
    assert {"p_fold0", "fold_std"} <= set(res.predictions.columns)
    cols = res.predictions[[f"p_fold{k}" for k in range(TINY_CV_K)]].to_numpy()
    assert np.allclose(res.predictions["prob"], cols.mean(1))
    # what evaluation counts as "trained on": the ids of any fold model's training split
    folds = pd.read_csv(tiny_cv / "folds.csv", dtype={"id": str})
    assert ens.train_ids() == set(folds["id"])
    with pytest.raises(DataError, match="no common validation split"):
        evaluate_run(tiny_cv, progress=False)


# --------------------------------------------------------------------------- label issues


def test_label_issues_rank_injected_flips_on_clean_probabilities():
    """cleanlab on probabilities of a decent model: flipped labels get the lowest quality."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = np.clip(np.where(y == 1, rng.beta(8, 2, 1000), rng.beta(2, 8, 1000)), 0, 1)
    flip = rng.choice(1000, 100, replace=False)
    noisy = y.copy()
    noisy[flip] = 1 - noisy[flip]
    out = li.label_issues(noisy, p)
    top = set(np.argsort(out["label_quality"].to_numpy())[:100])
    assert len(top & set(flip)) >= 80
    assert out.loc[out["label_issue"], "suggested_label"].ne(
        pd.Series(noisy)[out["label_issue"]]).all()


def test_cleanlab_missing_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_cleanlab(name, *a, **k):
        if name.startswith("cleanlab"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    with pytest.raises(PcamLensError, match="cleanlab is not installed") as e:
        li.label_issues([0, 1], [0.2, 0.8])
    assert "requirements.txt" in e.value.fix


# --------------------------------------------------------------------------- the queue


def test_queue_orders_label_errors_and_spread():
    df = pd.DataFrame({"id": list("abcde"), "label": [0, 1, 0, 1, 0],
                       "prob": [0.9, 0.2, 0.1, 0.6, 0.5], "loss": [2.3, 1.6, 0.1, 0.5, 0.7],
                       "label_quality": [0.1, 0.2, 0.9, 0.6, 0.05],
                       "label_issue": [True, True, False, False, False],
                       "tta_spread": [0.01, 0.3, 0.02, 0.2, 0.1]})
    q, _, _ = review_queue(df, "label_errors")
    assert list(q["id"]) == ["a", "b", "e", "d", "c"]  # flagged first, then by quality
    q, done, total = review_queue(df, "spread", reviewed={"b"})
    assert list(q["id"]) == ["d", "e", "c", "a"] and (done, total) == (1, 5)
    with pytest.raises(PcamLensError, match="model.crossval"):
        review_queue(df.drop(columns=["label_quality"]), "label_errors")


def test_queue_cli_exports_the_whole_set_queue(tiny_cv, tmp_path, capsys):
    out = tmp_path / "q.csv"
    log = tmp_path / "log.sqlite"
    oof = pd.read_csv(tiny_cv / "oof_predictions.csv", dtype={"id": str})
    first = build_queue(tiny_cv, "label_errors", log_path=log).table["id"].iloc[0]
    ReviewLog(log).record("t", "cv-tiny", first, "confirm", 0)
    assert queue_main([str(tiny_cv), "--order", "label-errors", "--out", str(out),
                       "--log", str(log)]) == 0
    q = pd.read_csv(out, dtype={"id": str})
    assert len(q) == TINY_CV_N - 1 and first not in set(q["id"])
    flagged = q[q["label_issue"]]
    assert list(q["id"][:len(flagged)]) == list(flagged["id"])  # flagged ones first
    assert q["path"].str.endswith(".tif").all()
    assert set(q["id"]) <= set(oof["id"])
    assert queue_main([str(tiny_cv), "--order", "nonsense"]) == 2
    assert "Unknown review order" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--folds", "1"], "at least 2 folds"),
    (["--folds", "50", "--max-items", "60"], "too few for 50 folds"),
    (["--folds", "30", "--max-items", "60"], "fewer than the 30 folds"),
])
def test_bad_fold_counts(argv, message, kaggle_sample, tmp_path, capsys):
    rc = crossval_main(["--data", str(kaggle_sample), "--no-checks", "--arch",
                        "test_efficientnet", "--no-pretrained", "--run-dir",
                        str(tmp_path / "cv"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:") and "Fix:" in err
    assert not (tmp_path / "cv").exists()  # nothing half-written


def test_oof_from_another_source_or_format(tiny_cv, h5_sample, tmp_path):
    cv = open_crossval(tiny_cv)
    with pytest.raises(RunError, match="other data"):
        read_oof(cv, open_source(h5_sample, "train"))
    old = tmp_path / "old"
    shutil.copytree(tiny_cv, old, ignore=shutil.ignore_patterns("features", "fold-*"))
    cvj = json.loads((old / "cv.json").read_text())
    (old / "cv.json").write_text(json.dumps({**cvj, "format_version": 0}))
    with pytest.raises(RunError, match="format 0"):
        open_crossval(old)
    (old / "cv.json").write_text(json.dumps(cvj))
    oof = pd.read_csv(old / "oof_predictions.csv").drop(columns=["label_quality"])
    oof.to_csv(old / "oof_predictions.csv", index=False)
    with pytest.raises(RunError, match="lacks column"):
        read_oof(open_crossval(old))


def test_resume_refuses_a_fold_of_another_configuration(tiny_cv, tmp_path):
    cv = tmp_path / "cv"
    shutil.copytree(tiny_cv, cv)
    cfg_path = cv / "fold-1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["schedule"]["frozen_epochs"] = 99
    cfg_path.write_text(json.dumps(cfg))
    cvj = json.loads((cv / "cv.json").read_text())
    cvj["config"]["train"]["run_dir"] = str(cv)
    (cv / "cv.json").write_text(json.dumps({**cvj, "status": "running"}))
    with pytest.raises(RunError, match="another configuration"):
        resume_crossval(cv, log=lambda *_: None)


@pytest.mark.slow
def test_killed_crossval_resumes_to_the_same_oof(tiny_cv, kaggle_sample, tmp_path):
    """SIGKILL after the first fold run is complete; --resume keeps it, redoes the rest, and
    ends with the OOF file of the uninterrupted cross-validation."""
    cv = tmp_path / "cv"
    argv = [sys.executable, "-m", "model.crossval", "--data", str(kaggle_sample),
            "--max-items", str(TINY_CV_N), "--no-checks", "--arch", "test_efficientnet",
            "--folds", str(TINY_CV_K), "--head-epochs", "2", "--device", "cpu",
            "--no-pretrained", "--run-dir", str(cv)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (cv / "fold-0" / "progress.json").exists() or \
            json.loads((cv / "fold-0" / "progress.json").read_text())["status"] != "complete":
        assert proc.poll() is None and time.time() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cv / "oof_predictions.csv").exists()
    res = subprocess.run([sys.executable, "-m", "model.crossval", "--resume", str(cv)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Fold 0: complete, kept" in res.stdout
    a = pd.read_csv(cv / "oof_predictions.csv")
    b = pd.read_csv(tiny_cv / "oof_predictions.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6)


@pytest.mark.slow
def test_prune_round_leaves_flagged_labels_out_of_training_only(kaggle_sample, tmp_path):
    cv = run_crossval(tiny_cv_config(kaggle_sample, tmp_path / "cv", prune_rounds=1),
                      log=lambda *_: None)
    oof = pd.read_csv(cv / "oof_predictions.csv", dtype={"id": str})
    assert len(oof) == TINY_CV_N  # every patch is still predicted
    pruned = set(oof.loc[oof["pruned"], "id"])
    assert 0 < len(pruned) < TINY_CV_N  # an untrained net: many look wrong
    for k in range(TINY_CV_K):
        train = set(_ids(cv / f"fold-{k}" / "train_ids.csv"))
        held = set(_ids(cv / f"fold-{k}" / "valid_ids.csv"))
        assert train.isdisjoint(pruned) and train.isdisjoint(held)
        assert train | held | pruned == set(oof["id"])
    assert json.loads((cv / "cv_metrics.json").read_text())["n_pruned"] == len(pruned)
