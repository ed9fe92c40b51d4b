"""Viewer state: persisted settings and cached loaders (source, run, predictions, heat maps).

Caching rules:
- a data source is opened once per (spec, split, modification time) with st.cache_resource;
- a model loads once per (run_dir, checkpoint, checkpoint_mtime) with st.cache_resource and is
  only used read-only (inference and Grad-CAM run under one lock, because Grad-CAM hooks);
- heavy results (predictions, Grad-CAM, dataset checks) are keyed by run + checkpoint time +
  source key, so retraining or changing data never shows stale numbers.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from model.errors import DataError, PcamLensError, RunError

SETTINGS_NAME = "viewer.json"
DEFAULTS = {"source_kind": "synthetic", "path": "", "split": "train", "run": None,
            "runs_root": None, "checkpoint": "best", "reviewer": ""}
SOURCE_KINDS = {"synthetic": "Built-in synthetic set", "kaggle": "Kaggle folder",
                "pcam-h5": "PCam HDF5 (folder or _x.h5 file)", "folders": "Class folders",
                "path": "Any path (auto-detect)"}
BIG_SOURCE = 20_000  # above this, whole-source work (predictions, checks) is on demand only
MODEL_LOCK = threading.RLock()


# --------------------------------------------------------------------------- model/ API


@st.cache_resource(show_spinner=False)
def api():
    """The model/ modules the viewer calls; stand-ins from viewer._fallback for the ones that
    do not exist yet (reported on the Runs page)."""
    import importlib

    from viewer import _fallback

    mods, missing = {}, []
    for name in ("inference", "gradcam", "evaluate"):
        try:
            mods[name] = importlib.import_module(f"model.{name}")
        except ImportError:
            mods[name] = _fallback if name != "evaluate" else None
            missing.append(f"model.{name}")
    mods["missing"] = missing
    return mods


# --------------------------------------------------------------------------- settings


def settings_path() -> Path:
    home = os.environ.get("PCAM_LENS_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".config" / "pcam-lens"
    return base / SETTINGS_NAME


def load_settings() -> dict:
    try:
        data = json.loads(settings_path().read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError
    except (OSError, ValueError):
        data = {}
    return {k: data.get(k, v) for k, v in DEFAULTS.items()}


def save_settings(values: dict) -> str | None:
    """Write the settings atomically; return an error message instead of raising."""
    from model.atomic import write_json

    try:
        write_json(settings_path(), {k: values.get(k) for k in DEFAULTS}, fsync=False)
    except OSError as e:
        return f"Could not save viewer settings to {settings_path()}: {e}"
    return None


def runs_root(settings: dict) -> Path:
    from model.run import default_runs_root

    return Path(settings["runs_root"]).expanduser() if settings.get("runs_root") \
        else default_runs_root()


# --------------------------------------------------------------------------- sources


def source_spec(kind: str, path: str) -> str:
    if kind == "synthetic":
        return "synthetic"
    path = (path or "").strip()
    if not path:
        raise DataError(f"Enter the path of the {SOURCE_KINDS[kind].lower()} in the sidebar.")
    return path


def source_key(spec: str, split: str) -> tuple:
    """(spec, split, stamp): the stamp changes when the folder or its labels change."""
    stamp = 0.0
    if not spec.startswith("synthetic"):
        p = Path(spec).expanduser()
        for q in (p, p / "train_labels.csv", p / "train", p / "test"):
            try:
                stamp = max(stamp, q.stat().st_mtime)
            except OSError:
                pass
    return (spec, split, stamp)


@st.cache_resource(max_entries=6, show_spinner="Opening the data source...")
def _open_source(spec: str, split: str, stamp: float):
    from model.sources import open_source

    return open_source(spec, split)


def open_source_cached(key: tuple):
    return _open_source(*key)


def check_kind(kind: str, source) -> str | None:
    """A warning when the path holds another kind of source than the one chosen."""
    if kind in ("synthetic", "path") or source.kind == kind:
        return None
    if kind == "kaggle" and source.kind == "images":
        return None
    return (f"You chose “{SOURCE_KINDS[kind]}” but this path holds a {source.kind} source; "
            f"it is shown as such.")


# --------------------------------------------------------------------------- runs


def run_summary(run_dir: Path) -> dict:
    """Name, status and headline metric of a run for the run selector (never raises)."""
    from model.run import read_config, read_progress

    out = {"name": run_dir.name, "dir": str(run_dir), "status": "unknown", "auc": None,
           "epochs": "", "arch": "", "data": "", "synthetic": False, "error": None}
    try:
        cfg = read_config(run_dir)
        out["arch"] = cfg.get("model", {}).get("arch", "")
        d = cfg.get("data", {})
        out["synthetic"] = bool(d.get("synthetic"))
        out["data"] = "synthetic" if out["synthetic"] else str(d.get("path"))
    except PcamLensError as e:
        out["error"] = str(e)
    prog = read_progress(run_dir)
    out["status"] = prog.get("status", "unknown")
    if "epochs_total" in prog:
        out["epochs"] = f"{prog.get('epochs_done', 0)}/{prog['epochs_total']}"
    try:
        out["auc"] = json.loads((run_dir / "metrics.json").read_text()).get("auc")
    except (OSError, ValueError, AttributeError):
        pass
    return out


def run_label(s: dict) -> str:
    if s["error"]:
        return f"{s['name']} · broken"
    auc = f" · AUC {s['auc']:.3f}" if isinstance(s["auc"], (int, float)) else ""
    status = s["status"] + (f" {s['epochs']}" if s["status"] == "running" else "")
    return f"{s['name']} · {status}{auc}" + (" · SYNTHETIC" if s["synthetic"] else "")


def run_key(run_dir: Path, checkpoint: str) -> tuple:
    """(run_dir, checkpoint, checkpoint_mtime); RunError when the weights are missing."""
    from model.run import read_config, weights_path

    read_config(run_dir)
    path = weights_path(run_dir, checkpoint)
    try:
        return (str(run_dir), checkpoint, path.stat().st_mtime)
    except FileNotFoundError:
        raise RunError(f"Run {run_dir.name} has no {path.name} yet.", path=path,
                       fix="Wait for its first epoch to finish, or pick another run.") from None


@st.cache_resource(max_entries=3, show_spinner="Loading the model...")
def load_model(run_dir: str, checkpoint: str, mtime: float):
    from model.run import load_run

    return load_run(run_dir, checkpoint)


def loaded(rk: tuple):
    return load_model(*rk)


@st.cache_data(max_entries=8, show_spinner=False)
def read_run_csv(run_dir: str, name: str, mtime: float) -> pd.DataFrame | None:
    try:
        return pd.read_csv(Path(run_dir) / name, dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def run_csv(run_dir: Path, name: str) -> pd.DataFrame | None:
    p = Path(run_dir) / name
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return None
    return read_run_csv(str(run_dir), name, mtime)


def run_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What the sidebar chose, resolved. Pages read it with `ctx()`."""

    settings: dict
    source: object | None = None
    src_key: tuple | None = None
    source_error: str | None = None
    run_dir: Path | None = None
    run_key: tuple | None = None
    run_error: str | None = None
    runs: list[dict] = field(default_factory=list)
    reviewer: str = ""

    @property
    def run_name(self) -> str:
        return self.run_dir.name if self.run_dir else ""

    @property
    def synthetic(self) -> bool:
        return bool(self.source is not None and self.source.synthetic)


def ctx() -> Context:
    return st.session_state["_ctx"]


# --------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Predictions of one run over some patches: df has id, label, prob, loss, pred, correct
    and `idx` (the row in `source`, where the patch pixels are read; -1 when absent).
    `token` identifies them for caches."""

    df: pd.DataFrame
    origin: str
    source: object
    whole_source: bool
    token: tuple = ()


@st.cache_resource(show_spinner=False)
def _memo_store() -> dict:
    return {}


def _memo(key: tuple, make, keep: int = 8):
    """Process-wide memo of shared read-only objects (big frames are not copied per rerun,
    unlike st.cache_data)."""
    store = _memo_store()
    if key not in store:
        value = make()
        while len(store) >= keep:
            store.pop(next(iter(store)))
        store[key] = value
    return store[key]


def _finish(df: pd.DataFrame, source, threshold: float = 0.5) -> pd.DataFrame:
    from model.metrics import per_patch_losses

    df = df.copy()
    df["id"] = df["id"].astype(str)
    lab = pd.to_numeric(df["label"], errors="coerce") if "label" in df else None
    if lab is None or lab.isna().any():
        df["label"] = lab if lab is not None else np.nan
        df["loss"] = np.nan
    else:
        df["label"] = lab.astype(int)
        if "loss" not in df:
            df["loss"] = per_patch_losses(lab.to_numpy(), df["prob"].to_numpy())
    df["pred"] = (df["prob"] >= threshold).astype(int)
    df["correct"] = np.where(df["label"].isna(), np.nan, df["pred"] == df["label"])
    df["idx"] = (pd.Index(source.ids).get_indexer(df["id"]) if source is not None
                 else np.full(len(df), -1))
    return df


def same_data(cfg: dict, source) -> bool:
    """True when `source` is the data the run was trained on (so its validation ids apply)."""
    d = cfg.get("data", {})
    if source.synthetic or d.get("synthetic"):
        return bool(source.synthetic and d.get("synthetic")
                    and d.get("seed", 0) == getattr(source, "seed", 0))
    try:
        return Path(str(d.get("path"))).resolve() == Path(str(source.describe()["path"])).resolve()
    except (OSError, TypeError):
        return False


@st.cache_resource(max_entries=2, show_spinner="Opening the run's data...")
def _run_source(desc_json: str):
    from model.sources import reopen_source

    return reopen_source(json.loads(desc_json))


def validation_predictions(c: Context) -> Predictions | None:
    """The run's valid_predictions.csv, with pixels from the sidebar source when it is the
    run's data, else from the run's data re-opened (None pixels when that fails)."""
    from model.run import read_config

    df = run_csv(c.run_dir, "valid_predictions.csv")
    if df is None or not {"id", "prob"} <= set(df.columns):
        return None
    cfg = read_config(c.run_dir)
    source = c.source if c.source is not None and same_data(cfg, c.source) else None
    where, sk = "the chosen source", c.src_key
    if source is None:
        desc = json.dumps(cfg.get("data", {}), sort_keys=True)
        sk = ("run-data", desc)
        try:
            source = _run_source(desc)
            where = "the run's data (re-opened)"
        except PcamLensError:
            source, where = None, "nowhere (the run's data cannot be opened)"
    token = ("valid", c.run_dir and str(c.run_dir), c.run_key, sk, len(df), float(df["prob"].sum()))
    origin = f"validation split of run {c.run_name} ({len(df):,} patches; pixels from {where})"
    return Predictions(_memo(token, lambda: _finish(df, source)), origin, source, False, token)


def source_predictions(c: Context) -> Predictions | None:
    """Whole-source predictions of the run: computed in this process, or evaluated earlier
    (model.evaluate files in <run>/eval/<data name>/, also those made with the CLI)."""
    if c.run_key is None or c.src_key is None:
        return None
    key = (c.run_key, c.src_key, 1)
    df = _store().get(key)
    if df is not None:
        return Predictions(df, f"all {len(df):,} patches of {c.source.describe_short()} "
                               f"(run {c.run_name})", c.source, True, ("source",) + key)
    return evaluated_predictions(c)


def _eval_dir(c: Context) -> Path | None:
    ev = api()["evaluate"]
    if ev is None or c.source is None or not c.source.labelled or c.src_key[1] != "train":
        return None
    return ev.default_out_dir(c.run_dir, c.src_key[0])


def evaluated_predictions(c: Context) -> Predictions | None:
    d = _eval_dir(c)
    m = run_metrics(d) if d is not None else None
    if not m or m.get("checkpoint_mtime") != c.run_key[2] or m.get("tta", 1) != 1:
        return None
    mine, theirs = c.source.describe(), m.get("data") or {}
    if any(mine.get(k) != theirs.get(k) for k in ("kind", "path", "n", "seed")):
        return None
    df = run_csv(d, "predictions.csv")
    if df is None or not {"id", "label", "prob"} <= set(df.columns):
        return None
    token = ("eval", str(d), (d / "predictions.csv").stat().st_mtime, c.src_key)
    return Predictions(_memo(token, lambda: _finish(df, c.source)),
                       f"all {len(df):,} patches of {c.source.describe_short()}, evaluated "
                       f"with run {c.run_name} (files in {d})", c.source, True, token)


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    """Whole-source predictions computed in this process: (run_key, src_key, tta) -> df."""
    return {}


def predict_source(rk: tuple, sk: tuple, tta: int = 1, progress=None) -> pd.DataFrame:
    """Predict every patch of a source (on demand: can take long); kept for this process."""
    store = _store()
    if (rk, sk, tta) in store:
        return store[(rk, sk, tta)]
    src = open_source_cached(sk)
    with MODEL_LOCK:
        probs = api()["inference"].predict_probs(loaded(rk), src, tta=tta, batch_size=128,
                                                 progress=progress or False)
    df = pd.DataFrame({"id": list(src.ids), "prob": np.asarray(probs, np.float64)})
    df["label"] = src.labels if src.labels is not None else np.nan
    while len(store) >= 6:
        store.pop(next(iter(store)))
    store[(rk, sk, tta)] = _finish(df, src)
    return store[(rk, sk, tta)]


def compute_source_predictions(c: Context, progress=None) -> Predictions:
    """Predict the whole sidebar source. Labelled data goes through model.evaluate, so the
    predictions and metrics are also written to <run>/eval/<data name>/ and reused after a
    restart; unlabelled data is predicted in memory."""
    d = _eval_dir(c)
    if d is not None:
        api()["evaluate"].evaluate_run(c.run_dir, data=c.src_key[0], checkpoint=c.run_key[1],
                                       progress=progress or False)
        p = evaluated_predictions(c)
        if p is not None:
            return p
    predict_source(c.run_key, c.src_key, 1, progress)
    return source_predictions(c)


def best_predictions(c: Context) -> Predictions | None:
    """Whole-source predictions when computed, else the run's validation predictions."""
    if c.run_dir is None or c.run_key is None:
        return None
    return source_predictions(c) or validation_predictions(c)


@st.cache_data(max_entries=64, show_spinner=False)
def page_probs(rk: tuple, sk: tuple, indices: tuple) -> np.ndarray:
    """Predictions for just the patches on screen (cached per run, checkpoint time, source)."""
    src = open_source_cached(sk)
    return predict_arrays(rk, src.read_batch(list(indices)))


def predict_arrays(rk: tuple, x: np.ndarray, tta: int = 1) -> np.ndarray:
    with MODEL_LOCK:
        return np.asarray(api()["inference"].predict_arrays(loaded(rk), x, tta), np.float64)


def patch_table(c: Context) -> tuple[pd.DataFrame, Predictions | None]:
    """One row per patch of the sidebar source (index = row in the source): id, label, and
    prob/loss/pred/correct where predictions exist. Shared, read-only: filter, don't modify."""
    preds = best_predictions(c)
    usable = preds is not None and (preds.whole_source or preds.source is c.source)
    src = c.source

    def make() -> pd.DataFrame:
        t = pd.DataFrame({"id": src.ids})
        t["label"] = src.labels if src.labels is not None else np.nan
        if usable:
            p = preds.df[preds.df["idx"] >= 0].set_index("idx")
            for col in ("prob", "loss", "pred", "correct"):
                t[col] = p[col].reindex(t.index)
        else:
            for col in ("prob", "loss", "pred", "correct"):
                t[col] = np.nan
        return t

    return _memo(("table", c.src_key, preds.token if usable else None), make), preds


# --------------------------------------------------------------------------- review log


def review_log(source):
    from model.review import ReviewLog, default_log_path

    return ReviewLog(default_log_path(None if source is None or source.synthetic
                                      else source.root))


# --------------------------------------------------------------------------- dataset checks


@st.cache_resource(show_spinner=False)
def _inspect_store() -> dict:
    return {}


def inspect_report(sk: tuple) -> dict | None:
    return _inspect_store().get(sk)


def run_inspect(sk: tuple, max_items: int | None) -> dict:
    from model.inspect import inspect_source

    rep = inspect_source(open_source_cached(sk), progress=False, max_items=max_items,
                         workers=2).to_dict()
    _inspect_store()[sk] = rep
    return rep


# --------------------------------------------------------------------------- Grad-CAM


@st.cache_data(max_entries=16, show_spinner=False)
def gradcam_layer_names(rk: tuple) -> list[str]:
    with MODEL_LOCK:
        return list(api()["gradcam"].gradcam_layers(loaded(rk)))


@st.cache_data(max_entries=64, show_spinner="Computing Grad-CAM...")
def gradcam_heats(rk: tuple, sk: tuple, patch_ids: tuple, layer: str, target: int | None
                  ) -> np.ndarray:
    """Heat maps [n,96,96] of a gallery of patches, computed in one batch."""
    src = open_source_cached(sk)
    x = src.read_batch([src.index_of(pid) for pid in patch_ids])
    return gradcam_arrays(rk, x, layer, target)


@st.cache_data(max_entries=512, show_spinner=False)
def gradcam_heat(rk: tuple, sk: tuple, patch_id: str, layer: str, target: int | None
                 ) -> np.ndarray:
    """Heat map [96,96] in 0..1 of one patch of a source (cached per run, checkpoint time,
    source, patch, layer and class)."""
    src = open_source_cached(sk)
    x = src.read_batch([src.index_of(patch_id)])
    return gradcam_arrays(rk, x, layer, target)[0]


def gradcam_arrays(rk: tuple, x: np.ndarray, layer: str, target: int | None) -> np.ndarray:
    with MODEL_LOCK:
        return np.asarray(api()["gradcam"].gradcam(loaded(rk), x, layer=layer, target=target),
                          np.float32)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    return api()["gradcam"].overlay(rgb, heat, alpha)
