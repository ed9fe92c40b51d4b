"""Data-parallel training and prediction under torchrun (model/training/distributed.py), on the
CPU with Gloo and two processes: the run directory is the one a single process writes, a killed DDP
run resumes to the same history, and torchrun prediction merges into one submission.

The torchrun tests start real process groups (`python -m torch.distributed.run --standalone`,
which picks a free port), each in about 20-40 s on two busy cores."""
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

from model.core.errors import PcamLensError
from model.data.batches import EpochSampler
from model.training.distributed import SINGLE, env_dist, rank_batch_size

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP_ARGS = ["--no-pretrained", "--arch", "resnet18", "--data", "synthetic:n=96", "--no-checks",
            "--no-lr-find", "--bs", "16"]
TIMEOUT = 240  # a hung process group fails the test instead of blocking the suite


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(module: str, *args, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run([*TORCHRUN, "-m", module, *map(str, args)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun {module} failed (exit {r.returncode}):\n" + \
        (r.stdout + r.stderr)[-4000:]
    return r


# --------------------------------------------------------------------------- no processes


def test_env_dist_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert env_dist() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    d = env_dist()
    assert (d.rank, d.world, d.local_rank, d.local_world) == (3, 4, 1, 2)
    assert d.enabled and not d.is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(PcamLensError, match="RANK"):
        env_dist()


def test_single_process_context_is_a_no_op():
    assert not SINGLE.enabled and SINGLE.is_main
    SINGLE.barrier()
    assert SINGLE.broadcast({"a": 1}) == {"a": 1}
    assert SINGLE.mean(2.5) == 2.5
    log = []
    SINGLE.quiet(log.append)("x")
    assert log == ["x"]


def test_global_batch_is_split_over_ranks():
    assert rank_batch_size(64, 1) == 64
    assert rank_batch_size(64, 4) == 16
    with pytest.raises(PcamLensError, match="multiple of 3"):
        rank_batch_size(64, 3)


@pytest.mark.parametrize("n,world", [(76, 2), (77, 2), (10, 3), (5, 8)])
def test_epoch_sampler_shards_cover_the_epoch(n, world):
    """Each rank gets the same number of indices; together they cover every index (the last
    ones padded with repeats), and the union is the single-process order."""
    shards = []
    for r in range(world):
        s = EpochSampler(n, seed=4, shuffle=True, rank=r, world=world)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(x) for x in shards}) == 1
    assert set(sum(shards, [])) == set(range(n))
    single = EpochSampler(n, seed=4, shuffle=True)
    single.set_epoch(2)
    assert sum(shards, [])[:n] == list(single)


# --------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    _torchrun("model.train", *DDP_ARGS, "--frozen-epochs", "0", "--epochs", "1",
              "--run-dir", run)
    return run


@pytest.mark.slow
def test_torchrun_training_writes_a_complete_run(ddp_run):
    from model.runs.format import read_config
    from model.runs.load import load_run

    for f in ("config.json", "history.csv", "best.safetensors", "last.safetensors",
              "resume.safetensors", "valid_predictions.csv", "metrics.json", "valid_ids.csv",
              "train_ids.csv", "progress.json", "lr_schedule.csv"):
        assert (ddp_run / f).is_file(), f
    assert not (ddp_run / ".tmp").exists()
    cfg = read_config(ddp_run)
    assert cfg["model"]["arch"] == "resnet18" and cfg["config"]["optim"]["bs"] == 16
    hist = pd.read_csv(ddp_run / "history.csv")
    assert len(hist) == 1 and hist.loc[0, "phase"] == "unfrozen"
    assert hist[["train_loss", "valid_loss", "accuracy", "auc"]].notna().all().all()
    # every validation id exactly once, with the labels of the split
    valid = pd.read_csv(ddp_run / "valid_ids.csv", dtype={"id": str})
    preds = pd.read_csv(ddp_run / "valid_predictions.csv", dtype={"id": str})
    assert sorted(preds["id"]) == sorted(valid["id"]) and preds["id"].is_unique
    assert (preds.set_index("id").loc[valid["id"], "label"].to_numpy()
            == valid["label"].to_numpy()).all()
    m = json.loads((ddp_run / "metrics.json").read_text())
    assert m["n"] == len(valid) and 0 <= m["auc"] <= 1
    assert json.loads((ddp_run / "progress.json").read_text())["status"] == "complete"
    # as many steps as one process takes: a global batch of 16 is 8 patches on each rank
    n_train = len(pd.read_csv(ddp_run / "train_ids.csv"))
    assert len(pd.read_csv(ddp_run / "lr_schedule.csv")) == n_train // 16
    loaded = load_run(ddp_run)
    assert not loaded.model.training and loaded.classes == cfg["model"]["classes"]


@pytest.mark.slow
def test_torchrun_prediction_merges_into_one_submission(ddp_run, tmp_path):
    from model import predict

    data = "synthetic:n=23,seed=5"  # shards of 12 and 11
    out = tmp_path / "sub.csv"
    _torchrun("model.predict", ddp_run, "--data", data, "--out", out, "--precision", "fp32",
              "--batch-size", "4", "--no-progress")
    # parts removed; the record beside the submission: both processes, what ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv", "sub.csv-metadata.json"]
    rec = json.loads((tmp_path / "sub.csv-metadata.json").read_text())
    assert rec["processes"] == 2 and rec["n"] == 23 and rec["engine"]["backend"] == "eager"
    single = tmp_path / "single" / "sub.csv"
    assert predict.main([str(ddp_run), "--data", data, "--out", str(single), "--precision",
                         "fp32", "--batch-size", "4", "--no-progress"]) == 0
    got, want = pd.read_csv(out, dtype={"id": str}), pd.read_csv(single, dtype={"id": str})
    assert list(got["id"]) == list(want["id"]) and got["id"].is_unique and len(got) == 23
    np.testing.assert_allclose(got["label"], want["label"], atol=1e-6)


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun's workers are not in its process group)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


@pytest.mark.slow
def test_killed_torchrun_run_resumes_under_torchrun(tmp_path):
    """SIGKILL every process after the first completed epoch, then --resume with torchrun:
    the run completes with each epoch recorded once and the first epoch untouched."""
    run = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "model.train", *DDP_ARGS, "--frozen-epochs", "1", "--epochs", "1",
           "--run-dir", str(run)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    progress = run / "progress.json"
    t0 = time.time()
    try:
        while time.time() - t0 < TIMEOUT and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["epochs_done"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
    finally:
        for pid in _process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    before = json.loads(progress.read_text())
    assert before["status"] != "complete", (
        "the run completed before SIGKILL landed, so resuming was not tested")
    first = pd.read_csv(run / "history.csv").iloc[0]
    r = _torchrun("model.train", "--resume", run)
    assert f"Resuming {run} after epoch {before['epochs_done']} of 2" in r.stdout + r.stderr
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [0, 1] and list(hist["phase"]) == ["frozen", "unfrozen"]
    pd.testing.assert_series_equal(hist.iloc[0], first)
    assert json.loads(progress.read_text())["status"] == "complete"
    assert (run / "metrics.json").is_file()
