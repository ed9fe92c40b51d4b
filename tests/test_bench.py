"""model.bench --quick end to end, in-process, on a tiny synthetic set: every row is there with
positive numbers and ratio = ours/stock. No timing assertions (the machine is shared)."""
from __future__ import annotations

import json
import math

import pytest

from model import bench
from model.benchmarks.suite import ROW_KEYS


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--data", "synthetic", "--arch", "resnet18",
                       "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # the benchmark trains a few steps of both learners
def test_every_row_has_positive_numbers_and_ratio(result):
    rows = {r["key"]: r for r in result["rows"]}
    assert set(ROW_KEYS) <= set(rows)
    for r in rows.values():
        assert r["ours"] > 0 and r["stock"] > 0, r
        assert math.isclose(r["ratio"], r["ours"] / r["stock"], rel_tol=1e-9), r
        assert r["unit"] in ("patches/s", "img/s", "ms/patch")
        assert r["ours_path"] and r["stock_path"]
    assert rows["gradcam"]["unit"] == "ms/patch"
    assert math.isclose(rows["gradcam"]["speedup"], 1 / rows["gradcam"]["ratio"])


@pytest.mark.slow
def test_environment_and_agreement_are_reported(result):
    hw, v = result["hardware"], result["versions"]
    assert hw["cores"] >= 1 and isinstance(hw["cpu_bf16"], bool) and hw["cpu"]
    assert len(hw["load_avg"]) == 3
    assert {"torch", "fastai", "timm"} <= set(v)
    assert result["settings"]["quick"] and result["settings"]["n"] == 16
    a = result["agreement"]
    # the stock fastai pipeline and ours compute the same fp32 function of the same weights
    assert a["stock_vs_fp32_max_abs_diff"] < 1e-4
    assert a["ours_vs_fp32_max_abs_diff"] < (0.05 if a["ours_precision"] == "bf16" else 1e-4)
    assert 0 <= a["auc_fp32"] <= 1 and a["auc_diff_ours_vs_fp32"] >= 0
    assert a["gradcam_max_abs_diff"] < 0.05


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda") and "Fix:" in err


def test_bad_settings_are_refused(capsys):
    assert bench.main(["--quick", "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert bench.main(["--quick", "--memory", "a,b"]) == 2


@pytest.mark.slow  # three processes: stock fastai, model.predict twice
def test_inference_mode_runs_stock_and_ours_end_to_end_on_the_same_real_files(tiny_run,
                                                                               tmp_path,
                                                                               kaggle_sample,
                                                                               capsys):
    out = tmp_path / "infer.json"
    assert bench.main(["--inference", "--quick", "--run", str(tiny_run), "--data",
                       str(kaggle_sample), "--n", "40", "--backends", "auto,eager",
                       "--json", str(out)]) == 0
    report = capsys.readouterr().out
    res = json.loads(out.read_text())
    names = [r["name"] for r in res["results"]]
    assert names == ["stock, num_workers=0", "ours, default (auto), first use",
                     "ours, --backend eager", "ours, default, export in place"]
    assert res["best_stock"] == "stock, num_workers=0" and res["n"] == 40
    for r in res["results"]:
        assert r["wall_s"] > 0 and 0 <= r["auc"] <= 1, r
        assert r["wall_s"] >= (r["predict_s"] or 0)  # the process includes its own timing
        # the stock fastai script with the run's weights computes the run's probabilities, up
        # to the resampler: this quick run upsamples its 64 px crop to 96 px, fastai with PIL
        # on uint8, ours with torch on floats (a 96 px run agrees to 5e-6: README)
        tol = 0.02 if r["name"].startswith("stock") else 1e-4
        assert r["max_abs_diff_vs_eager"] < tol, r
    auto = res["results"][1]["engine"]
    assert auto["backend"] == "eager" and "40 forward passes < 20,000" in auto["why"]
    assert {"decode_files", "eager"} <= set(res["model_only_patches_per_s"])
    assert "baseline = the faster stock configuration" in report and "AUC" in report


def test_inference_mode_refuses_bad_backends_and_a_missing_run(capsys):
    assert bench.main(["--inference", "--quick"]) == 2
    assert "--inference needs --run RUN" in capsys.readouterr().err
    assert bench.main(["--inference", "--quick", "--run", "nowhere", "--backends", "x"]) == 2
    assert "error:" in capsys.readouterr().err
