"""Training round trip: train -> run directory -> load_run, and SIGKILL -> --resume.

Runs are tiny (resnet18 from scratch on ~160 synthetic patches, a few seconds an epoch) so the
whole module stays well under two minutes on 2 cores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.runs.format import read_config, read_safetensors
from model.runs.load import load_run
from model.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--no-pretrained", "--arch", "resnet18", "--data", "synthetic:n=160", "--no-checks",
        "--no-lr-find", "--bs", "32", "--seed", "3"]


def _train_subprocess(args, log):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "model.train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_main([*TINY, "--frozen-epochs", "1", "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def test_run_directory_is_complete_and_self_describing(tiny_run):
    for f in ("config.json", "history.csv", "best.safetensors", "last.safetensors",
              "resume.safetensors", "valid_predictions.csv", "metrics.json", "valid_ids.csv",
              "train_ids.csv", "progress.json", "lr_schedule.csv"):
        assert (tiny_run / f).is_file(), f
    cfg = read_config(tiny_run)
    assert cfg["model"]["arch"] == "resnet18"
    assert (cfg["input"]["crop"], cfg["input"]["size"]) == (64, 96)  # the quick preset
    assert len(cfg["input"]["mean"]) == 3
    assert cfg["data"]["synthetic"] is True
    assert cfg["split"]["method"] == "stratified"
    assert {"torch", "fastai", "timm"} <= set(cfg["versions"])
    hist = pd.read_csv(tiny_run / "history.csv")
    assert list(hist.epoch) == [0, 1] and list(hist.phase) == ["frozen", "unfrozen"]
    assert hist[["train_loss", "valid_loss", "accuracy", "auc"]].notna().all().all()
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert {"auc", "auc_ci", "accuracy", "n"} <= set(m) and m["synthetic"] is True
    assert json.loads((tiny_run / "progress.json").read_text())["status"] == "complete"
    # split: disjoint, stratified, everything used once
    tr = pd.read_csv(tiny_run / "train_ids.csv")
    va = pd.read_csv(tiny_run / "valid_ids.csv")
    assert not set(tr.id) & set(va.id) and len(tr) + len(va) == 160
    assert abs(va.label.mean() - tr.label.mean()) < 0.1


def test_load_run_reproduces_validation_predictions(tiny_run):
    """load_run (config.json + safetensors only) rebuilds the exact model: its fp32 outputs on
    the validation patches match what training recorded (under bf16 autocast) closely."""
    from model.data.open import open_source
    from model.nets.transforms import prepare

    loaded = load_run(tiny_run)
    assert not loaded.model.training
    preds = pd.read_csv(tiny_run / "valid_predictions.csv", dtype={"id": str})
    src = open_source("synthetic:n=160")
    x = torch.from_numpy(src.read_batch([src.index_of(i) for i in preds.id]))
    with torch.no_grad():
        p = torch.softmax(loaded.model(prepare(x, loaded.input)), 1)[:, 1].numpy()
    assert np.abs(p - preds.prob.to_numpy()).max() < 0.05  # recorded under bf16 autocast
    best, meta = read_safetensors(tiny_run / "best.safetensors")
    assert set(best) == set(loaded.model.state_dict())


def test_existing_run_dir_is_not_overwritten(tiny_run, capsys):
    before = (tiny_run / "config.json").read_bytes()
    assert train_main([*TINY, "--run-dir", str(tiny_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tiny_run / "config.json").read_bytes() == before


def _wait_for_epochs(run: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((run / "progress.json").read_text()).get("epochs_done", 0) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError("training too slow")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_completes_the_run(tmp_path):
    """kill -9 in the middle of an epoch loses only that epoch; the run on disk stays loadable
    and --resume completes it on the same one-cycle schedule."""
    run = tmp_path / "cut"
    with open(tmp_path / "cut.log", "wb") as log:
        proc = _train_subprocess([*TINY, "--frozen-epochs", "1", "--epochs", "3",
                                  "--run-dir", str(run)], log)
        _wait_for_epochs(run, 2, proc)
        time.sleep(1.0)  # into epoch 3
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / "progress.json").read_text())["status"] == "running"
    load_run(run)  # loadable as it stands
    for f in run.iterdir():
        assert not f.name.endswith(".tmp"), f"temporary file left behind: {f.name}"
    assert train_main(["--resume", str(run)]) == 0
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.epoch) == [0, 1, 2, 3]  # each epoch exactly once
    assert list(hist.phase) == ["frozen"] + ["unfrozen"] * 3
    sched = pd.read_csv(run / "lr_schedule.csv")
    iters = sched.groupby("epoch").size()
    assert list(iters.index) == [0, 1, 2, 3] and iters.nunique() == 1
    unfrozen = sched[sched.phase == "unfrozen"].lr.to_numpy()
    peak = int(unfrozen.argmax())  # one cycle: warm-up then annealing, across the restart
    assert np.all(np.diff(unfrozen[:peak + 1]) >= -1e-12)
    assert np.all(np.diff(unfrozen[peak:]) <= 1e-12)
    assert json.loads((run / "progress.json").read_text())["status"] == "complete"


def test_interrupted_then_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Resuming restores weights, optimizer moments, data order and augmentation seeds: a run
    stopped after epoch 2 and resumed ends bit-for-bit where an uninterrupted run ends."""
    from model.training import callbacks

    args = [*TINY, "--data", "synthetic:n=120", "--frozen-epochs", "1", "--epochs", "2"]
    assert train_main([*args, "--run-dir", str(tmp_path / "ref")]) == 0
    after_epoch = callbacks.RunRecorder.after_epoch

    def stop_after_second(self):
        after_epoch(self)
        if self.state["epochs_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.RunRecorder, "after_epoch", stop_after_second)
    assert train_main([*args, "--run-dir", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(callbacks.RunRecorder, "after_epoch", after_epoch)
    assert train_main(["--resume", str(tmp_path / "cut")]) == 0
    a, _ = read_safetensors(tmp_path / "ref" / "last.safetensors")
    b, _ = read_safetensors(tmp_path / "cut" / "last.safetensors")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    ha = pd.read_csv(tmp_path / "ref" / "history.csv")
    hb = pd.read_csv(tmp_path / "cut" / "history.csv")
    np.testing.assert_allclose(ha.train_loss, hb.train_loss, rtol=1e-6)


def test_resume_of_a_run_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"format": "pcam-lens-run",
                                                 "format_version": 1}))
    assert train_main(["--resume", str(run)]) == 2
    assert "no epoch had completed" in capsys.readouterr().err


def test_future_run_format_is_refused(tiny_run, tmp_path):
    from model.core.errors import RunError

    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg["format_version"] = 99
    run = tmp_path / "future"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="version 99"):
        load_run(run)


def test_default_preset_follows_the_data(kaggle_sample):
    """`python -m model.train` with no --preset resolves like --preset standard on real
    patches (the README's real-data command) and like --preset quick on the synthetic set;
    an explicit option wins over the preset's value."""
    from model.train import get_args_parser
    from model.training.config import TrainConfig
    from model.training.prepare import prepare_new

    def prepared(*argv):
        args = get_args_parser().parse_args([*argv, "--no-checks", "--max-items", "100"])
        return prepare_new(TrainConfig.from_args(args), log=lambda *_: None).config

    real = str(kaggle_sample)
    assert prepared("--data", real) == prepared("--data", real, "--preset", "standard")
    synthetic = prepared("--data", "synthetic:n=100")
    assert synthetic == prepared("--data", "synthetic:n=100", "--preset", "quick")
    assert synthetic != prepared("--data", "synthetic:n=100", "--preset", "standard")
    explicit = prepared("--data", real, "--preset", "quick", "--epochs", "2", "--crop", "80")
    assert explicit.schedule.epochs == 2 and explicit.schedule.preset == "quick"
    assert (explicit.input.crop, explicit.input.size) == (80, 80)  # --crop alone: fed as is
