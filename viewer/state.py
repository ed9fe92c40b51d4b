"""Viewer state: persisted settings and cached loaders (source, run, predictions, heat maps).

Predictions and Grad-CAM live in viewer.preds. Caching rules:
- a data source is opened once per (spec, split, modification time) with st.cache_resource;
- a model loads once per (run_dir, checkpoint, checkpoint_mtime) with st.cache_resource and is
  only used read-only (inference and Grad-CAM run under one lock, because Grad-CAM hooks);
- heavy results (predictions, Grad-CAM, dataset checks) are keyed by run + checkpoint time +
  source key, so retraining or changing data never shows stale numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

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


# --------------------------------------------------------------------------- model/ API


@st.cache_resource(show_spinner=False)
def api() -> dict:
    """The model/ modules the viewer calls (imported once: they pull in torch)."""
    import importlib

    mods = {}
    for name in ("inference", "gradcam", "evaluate"):
        try:
            mods[name] = importlib.import_module(f"model.{name}")
        except ImportError as e:
            raise PcamLensError(f"model.{name} cannot be imported ({e}).",
                                fix="Update the checkout: the viewer needs model/" + name
                                    + ".py.") from None
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
