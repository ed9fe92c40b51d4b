"""`python -m model.bench --inference --run RUN`: files -> submission, end to end, for the
stock fastai path and for this project's default path and each backend, on the same files
and weights, each in its own process (start-up included, as a user meets it).

- data: the labelled patches of --data (the shared Kaggle sample by default) repeated under
  new ids up to --n files (24,000 by default: the sample four times), hard-linked (copied
  across file systems) into test/ of a scratch Kaggle folder, with sample_submission.csv;
- stock: model/benchmarks/stock_predict.py (vision_learner + test_dl + get_preds, bs 64,
  fp32) with num_workers=0 and with fastai's default workers; the faster is the baseline;
- ours: `python -m model.predict RUN --data D --tta 1 --backend B` for B in --backends: auto
  is the default path (it pays its ONNX export on the first run: the run is copied without
  its engine/ folder first), then eager, compile, onnx (which reuses the export), then the
  default path again (the export in place, as model.train leaves it after 2+ minutes);
- model only: each backend's network on decoded, normalised patches in memory, and the
  decoding alone: which of the two bounds end to end;
- agreement: every path's AUC on the labels and its largest probability difference from fp32
  eager (model.predict --backend eager).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from model.benchmarks.suite import hardware_info, versions
from model.core.atomic import write_csv
from model.core.errors import DataError
from model.data.kaggle import KaggleSource
from model.data.open import open_source
from model.evaluation.engine import build_engine
from model.evaluation.predict import metadata_path
from model.nets.transforms import prepare
from model.runs.load import load_run

STOCK_CONFIGS = ("0", "default")


@dataclass
class InferenceBenchConfig:
    run: Path
    data: str
    n: int = 24_000
    backends: tuple[str, ...] = ("auto", "eager", "compile", "onnx")
    stock: tuple[str, ...] = STOCK_CONFIGS
    model_n: int = 2048  # patches for the model-only rates
    batch_size: int = 256


@dataclass
class PathResult:
    name: str
    what: str
    wall_s: float  # the whole process: start-up, reading, model, writing
    predict_s: float | None  # the process's own timing without start-up
    auc: float | None = None
    max_abs_diff_vs_eager: float | None = None
    auc_diff_vs_eager: float | None = None
    engine: dict = field(default_factory=dict)

    def patches_per_s(self, n: int) -> float:
        return n / self.wall_s


def make_files(spec: str, n: int, root: Path) -> tuple[Path, pd.DataFrame]:
    """A Kaggle folder with n test files: the labelled patches of `spec` repeated under new ids
    (<id>x00, <id>x01, ...), and the labels by id."""
    src = open_source(spec, "train", use_pack=False)
    if not isinstance(src, KaggleSource) or src.labels is None:
        raise DataError(f"--inference needs a labelled Kaggle folder; {spec} is "
                        f"{src.describe_short()}.", fix="Use --data ../shared/data/pcam-sample.")
    folder = root / "kaggle"
    (folder / "test").mkdir(parents=True)
    ids, labels = [], []
    for k in range(n):
        i, rep = k % len(src), k // len(src)
        pid = f"{src.ids[i]}x{rep:02d}"
        dst = folder / "test" / f"{pid}.tif"
        try:
            os.link(src.paths[i], dst)
        except OSError:  # another file system
            shutil.copyfile(src.paths[i], dst)
        ids.append(pid)
        labels.append(int(src.labels[i]))
    table = pd.DataFrame({"id": ids, "label": labels})
    write_csv(folder / "sample_submission.csv", table.assign(label=0), fsync=False)
    return folder, table


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise DataError(f"benchmark step failed ({' '.join(cmd[2:5])}): "
                        f"{done.stderr.strip().splitlines()[-1] if done.stderr else ''}",
                        fix="Run that command by hand to see the whole message.")
    return wall, done.stdout


def run_stock(run: Path, folder: Path, workers: str, out: Path) -> PathResult:
    wall, stdout = _timed([sys.executable, "-m", "model.benchmarks.stock_predict", str(run),
                           str(folder), str(out), "--workers", workers])
    info = json.loads(stdout.strip().splitlines()[-1])
    name = f"stock, num_workers={workers}" if workers != "default" else \
        f"stock, fastai default workers ({info['loader_workers']})"
    return PathResult(name, "vision_learner + test_dl + get_preds, bs 64, fp32", wall,
                      info["predict_s"], engine={"stock": info})


def run_ours(run: Path, folder: Path, backend: str, out: Path, again: bool = False
             ) -> PathResult:
    wall, _ = _timed([sys.executable, "-m", "model.predict", str(run), "--data", str(folder),
                      "--tta", "1", "--backend", backend, "--out", str(out), "--no-progress"])
    record = json.loads(metadata_path(out).read_text())
    eng = record["engine"]
    name = f"ours, --backend {backend}"
    if backend == "auto":
        name = ("ours, default, export in place" if again
                else "ours, default (auto), first use")
    return PathResult(name, f"model.predict: {eng['backend']} {eng['precision']}", wall,
                      record["seconds"], engine=eng)


def _probs(out: Path, table: pd.DataFrame) -> np.ndarray:
    got = pd.read_csv(out, dtype={"id": str}).set_index("id")["label"]
    return got.reindex(table["id"]).to_numpy(np.float64)


def model_only(run: Path, backends: tuple[str, ...], spec: str, n: int, bs: int) -> dict:
    """patches/s of each backend's network on decoded, normalised patches in memory, and of
    decoding the files alone (one core, as model.predict reads)."""
    loaded = load_run(run)
    src = open_source(spec, "train", use_pack=False)
    idx = np.arange(min(n, len(src)))
    t0 = time.perf_counter()
    x8 = src.read_batch(idx)
    decode = len(idx) / (time.perf_counter() - t0)
    x = prepare(torch.from_numpy(x8), loaded.input)
    rates = {"decode_files": round(decode, 1)}
    for b in dict.fromkeys("eager" if b == "auto" else b for b in backends):
        engine = build_engine(loaded, backend=b, precision="fp32")
        with torch.inference_mode():
            engine.model(x[:bs])  # warm-up (compiles, builds the session)
            engine.model(x[:bs])
            t0 = time.perf_counter()
            for s in range(0, len(x), bs):
                engine.model(x[s:s + bs])
            rates[engine.choice.backend] = round(len(x) / (time.perf_counter() - t0), 1)
    return rates


def run_inference_bench(cfg: InferenceBenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="pcam-lens-infer-bench-") as tmp:
        root = Path(tmp)
        folder, table = make_files(cfg.data, cfg.n, root)
        run = root / "run"  # a copy without engine/: the default path meets it as a user does
        shutil.copytree(cfg.run, run, ignore=shutil.ignore_patterns("engine", "predictions",
                                                                     "eval", "slides"))
        results = [run_stock(run, folder, w, root / f"stock-{w}.csv") for w in cfg.stock]
        outs = [root / f"stock-{w}.csv" for w in cfg.stock]
        for b in cfg.backends:
            results.append(run_ours(run, folder, b, root / f"ours-{b}.csv"))
            outs.append(root / f"ours-{b}.csv")
        if "auto" in cfg.backends and len(cfg.backends) > 1:
            # the default path again, as a user meets it from then on (and after a model.train
            # of 2+ minutes, which leaves the export in the run)
            results.append(run_ours(run, folder, "auto", root / "ours-auto2.csv", again=True))
            outs.append(root / "ours-auto2.csv")
        probs = [_probs(o, table) for o in outs]
        rates = model_only(run, cfg.backends, cfg.data, cfg.model_n, cfg.batch_size)
    y = table["label"].to_numpy()
    for r, p in zip(results, probs):
        r.auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None
    ref_i = next((k for k, r in enumerate(results) if r.engine.get("backend") == "eager"), None)
    if ref_i is not None:
        ref = results[ref_i]
        for r, p in zip(results, probs):
            r.max_abs_diff_vs_eager = float(np.abs(p - probs[ref_i]).max())
            if r.auc is not None and ref.auc is not None:
                r.auc_diff_vs_eager = abs(r.auc - ref.auc)
    stock = [r for r in results if r.name.startswith("stock")]
    best = min(stock, key=lambda r: r.wall_s)
    return {"hardware": hardware_info("cpu"), "versions": versions(), "n": cfg.n,
            "data": cfg.data, "run": str(cfg.run), "best_stock": best.name,
            "results": [asdict(r) for r in results], "model_only_patches_per_s": rates,
            "speedup_vs_best_stock": {r.name: round(best.wall_s / r.wall_s, 2)
                                      for r in results},
            "load_avg_after": [round(v, 2) for v in os.getloadavg()]}


def format_inference_report(res: dict) -> str:
    n = res["n"]
    best = next(r for r in res["results"] if r["name"] == res["best_stock"])
    hw = res["hardware"]
    lines = [f"files -> submission, {n:,} real patches ({res['data']} repeated), run "
             f"{res['run']}, TTA 1; {hw['cpu']}, {hw['cores']} cores, bf16 "
             f"{'yes' if hw['cpu_bf16'] else 'no'}",
             f"each path in its own process, start-up included; baseline = the faster stock "
             f"configuration ({res['best_stock']})", "",
             f"{'path':<44} {'wall s':>7} {'model s':>7} {'patch/s':>8} {'vs stock':>8} "
             f"{'AUC':>7} {'dAUC':>7} {'max|dp|':>8}"]
    for r in res["results"]:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r['name']:<44} {r['wall_s']:>7.1f} {f(r['predict_s'], '7.1f'):>7} "
                     f"{n / r['wall_s']:>8.0f} {best['wall_s'] / r['wall_s']:>7.2f}x "
                     f"{f(r['auc'], '.4f'):>7} {f(r['auc_diff_vs_eager'], '.4f'):>7} "
                     f"{f(r['max_abs_diff_vs_eager'], '.1e'):>8}")
    for r in res["results"]:
        if "why" in r["engine"]:
            lines.append(f"  {r['name']}: ran {r['engine']['backend']} ({r['engine']['why']})")
    rates = res["model_only_patches_per_s"]
    lines += ["", "model only (decoded, normalised patches in memory, batch 256), patches/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in rates.items() if k != "decode_files"),
              f"decoding the files alone (one core): {rates['decode_files']:.0f} patches/s",
              "(model s = the process's own time without start-up; dAUC and max|dp| against "
              "--backend eager, fp32)"]
    return "\n".join(lines)
