"""Training round trip: train -> run directory -> load_run -> evaluate, SIGKILL -> --resume,
and runs written by the first run format (before TrainConfig) still load, evaluate, resume.

The tests that train are marked slow; their runs are tiny (timm's 0.1M-parameter
test_efficientnet from scratch on 120-160 synthetic patches, about a second an epoch)."""
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

from model.evaluation.evaluate import evaluate_run
from model.runs.format import read_config, read_safetensors
from model.runs.load import load_run
from model.train import main as train_main
from model.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["--no-pretrained", "--arch", "test_efficientnet", "--data", "synthetic:n=160",
        "--no-checks", "--no-lr-find", "--bs", "32", "--seed", "3"]
# written by the code of commit 62e6dee (run format 1), killed after 2 of its 3 epochs
V1_RUN = REPO / "tests" / "data" / "run-v1"


def _train_subprocess(args, log):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "model.train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_main([*TINY, "--frozen-epochs", "1", "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


@pytest.mark.slow
def test_run_directory_is_complete_and_self_describing(trained_run):
    tiny_run = trained_run
    for f in ("config.json", "history.csv", "best.safetensors", "last.safetensors",
              "resume.safetensors", "valid_predictions.csv", "metrics.json", "valid_ids.csv",
              "train_ids.csv", "progress.json", "lr_schedule.csv"):
        assert (tiny_run / f).is_file(), f
    cfg = read_config(tiny_run)
    assert cfg["model"]["arch"] == "test_efficientnet"
    assert TrainConfig.from_run_config(cfg).resolved  # the resolved config, read back typed
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


@pytest.mark.slow
def test_load_run_reproduces_validation_predictions(trained_run):
    """load_run (config.json + safetensors only) rebuilds the exact model: its fp32 outputs on
    the validation patches match what training recorded (under bf16 autocast) closely."""
    from model.data.open import open_source
    from model.nets.transforms import prepare

    loaded = load_run(trained_run)
    assert not loaded.model.training
    preds = pd.read_csv(trained_run / "valid_predictions.csv", dtype={"id": str})
    src = open_source("synthetic:n=160")
    x = torch.from_numpy(src.read_batch([src.index_of(i) for i in preds.id]))
    with torch.no_grad():
        p = torch.softmax(loaded.model(prepare(x, loaded.input)), 1)[:, 1].numpy()
    assert np.abs(p - preds.prob.to_numpy()).max() < 0.05  # recorded under bf16 autocast
    best, meta = read_safetensors(trained_run / "best.safetensors")
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
        # 1,600 patches: an epoch of this tiny net lasts a few seconds, long enough to land
        # the kill inside the third one
        proc = _train_subprocess([*TINY, "--data", "synthetic:n=1600", "--frozen-epochs", "1",
                                  "--epochs", "3", "--run-dir", str(run)], log)
        _wait_for_epochs(run, 2, proc)
        time.sleep(0.5)  # into epoch 3
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_round_trip_train_checkpoint_evaluate(trained_run, tmp_path):
    """model.evaluate re-runs the best checkpoint on the run's own validation split and finds
    the AUC training recorded (training scored under bf16 autocast on bf16 CPUs)."""
    recorded = json.loads((trained_run / "metrics.json").read_text())
    res = evaluate_run(trained_run, out=tmp_path / "eval", tta=1, n_boot=50, progress=False,
                       precision="fp32")
    assert res.metrics["n"] == recorded["n"] == 32
    assert abs(res.metrics["auc"] - recorded["auc"]) < 0.02


def _copy_v1(tmp_path) -> Path:
    import shutil

    run = tmp_path / "run-v1"
    shutil.copytree(V1_RUN, run)
    return run


def test_a_first_format_run_loads_and_evaluates(tmp_path):
    """A run directory written before TrainConfig (format 1: a "train" section) loads, its
    configuration converts into the same dataclass, and it evaluates."""
    run = _copy_v1(tmp_path)
    cfg = read_config(run)
    assert cfg["format_version"] == 1 and "train" in cfg and "config" not in cfg
    config = TrainConfig.from_run_config(cfg)
    assert config.model.arch == "test_efficientnet" and config.optim.bs == 32
    assert (config.schedule.frozen_epochs, config.schedule.epochs) == (1, 2)
    assert config.data.spec == "synthetic:n=160,seed=0" and config.resolved
    loaded = load_run(run)
    assert loaded.input.crop == 64
    res = evaluate_run(run, out=tmp_path / "eval", tta=1, n_boot=20, progress=False)
    assert res.metrics["n"] == 32 and 0 <= res.metrics["auc"] <= 1


@pytest.mark.slow
def test_a_first_format_run_resumes_where_the_old_code_would_have_ended(tmp_path):
    """The v1 run was killed after epoch 2 of 3; resumed by this code, its last epoch has
    the train loss the old code's uninterrupted run recorded (1.811875730752945)."""
    run = _copy_v1(tmp_path)
    assert train_main(["--resume", str(run)]) == 0
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.epoch) == [0, 1, 2]
    assert hist.train_loss.iloc[-1] == pytest.approx(1.811875730752945, rel=1e-5)
    assert json.loads((run / "progress.json").read_text())["status"] == "complete"
    assert read_config(run)["format_version"] == 1  # resuming does not rewrite the config


@pytest.mark.slow
def test_training_into_a_log_file_writes_one_line_per_epoch(tmp_path):
    """stdout not a terminal (CI, nohup, > train.log): no redrawn progress bars, one plain
    line per epoch."""
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = _train_subprocess([*TINY, "--frozen-epochs", "1", "--epochs", "2", "--run-dir",
                                  str(tmp_path / "run")], log)
        assert proc.wait(timeout=300) == 0
    text = log_path.read_text()
    assert "\r" not in text and "█" not in text, text[:2000]
    epoch_lines = [ln for ln in text.splitlines() if ln.strip().startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("valid_loss" in ln for ln in epoch_lines), text
    assert len(text) < 2000, len(text)
