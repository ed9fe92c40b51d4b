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
from typing import NamedTuple

import pandas as pd
import streamlit as st

from model.core.atomic import write_json
from model.core.errors import DataError, RunError
from model.data.inspect import inspect_source
from model.data.open import open_source
from model.evaluation.duplicates import duplicate_report
from model.review.log import ReviewLog, default_log_path
from model.runs.format import default_runs_root, read_config, read_json
from model.runs.load import load_run, weights_path
from model.runs.summary import RunSummary

SETTINGS_NAME = "viewer.json"
DEFAULTS = {"source_kind": "synthetic", "path": "", "split": "train", "run": None,
            "runs_root": None, "checkpoint": "best", "reviewer": ""}
SOURCE_KINDS = {"synthetic": "Built-in synthetic set", "kaggle": "Kaggle folder",
                "pcam-h5": "PCam HDF5 (folder or _x.h5 file)", "folders": "Class folders",
                "path": "Any path (auto-detect)"}
BIG_SOURCE = 20_000  # above this, whole-source work (predictions, checks) is on demand only


class SourceKey(NamedTuple):
    """Identifies an opened source in the caches: the stamp changes when the folder or its
    labels change."""

    spec: str
    split: str
    stamp: float


class RunKey(NamedTuple):
    """Identifies a loaded model in the caches: retraining changes the checkpoint's mtime."""

    run_dir: str
    checkpoint: str
    mtime: float


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

    try:
        write_json(settings_path(), {k: values.get(k) for k in DEFAULTS}, fsync=False)
    except OSError as e:
        return f"Could not save viewer settings to {settings_path()}: {e}"
    return None


def runs_root(settings: dict) -> Path:
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


def source_key(spec: str, split: str) -> SourceKey:
    stamp = 0.0
    if not spec.startswith("synthetic"):
        p = Path(spec).expanduser()
        for q in (p, p / "train_labels.csv", p / "train", p / "test"):
            try:
                stamp = max(stamp, q.stat().st_mtime)
            except OSError:
                pass
    return SourceKey(spec, split, stamp)


@st.cache_resource(max_entries=6, show_spinner="Opening the data source...")
def _open_source(spec: str, split: str, stamp: float):
    return open_source(spec, split)


def open_source_cached(key: SourceKey):
    return _open_source(key.spec, key.split, key.stamp)


def check_kind(kind: str, source) -> str | None:
    """A warning when the path holds another kind of source than the one chosen."""
    if kind in ("synthetic", "path") or source.kind == kind:
        return None
    if kind == "kaggle" and source.kind == "images":
        return None
    return (f"You chose “{SOURCE_KINDS[kind]}” but this path holds a {source.kind} source; "
            f"it is shown as such.")


# --------------------------------------------------------------------------- runs


def run_key(run_dir: Path, checkpoint: str) -> RunKey:
    """RunError when the run has no weights of that checkpoint yet."""

    read_config(run_dir)
    path = weights_path(run_dir, checkpoint)
    try:
        return RunKey(str(run_dir), checkpoint, path.stat().st_mtime)
    except FileNotFoundError:
        raise RunError(f"Run {run_dir.name} has no {path.name} yet.", path=path,
                       fix="Wait for its first epoch to finish, or pick another run.") from None


@st.cache_resource(max_entries=3, show_spinner="Loading the model...")
def load_model(run_dir: str, checkpoint: str, mtime: float):
    return load_run(run_dir, checkpoint)


def loaded(rk: RunKey):
    return load_model(rk.run_dir, rk.checkpoint, rk.mtime)


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
    return read_json(Path(run_dir) / "metrics.json")


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What the sidebar chose, resolved. Pages read it with `ctx()`."""

    settings: dict
    source: object | None = None
    src_key: SourceKey | None = None
    source_error: str | None = None
    run_dir: Path | None = None
    run_key: RunKey | None = None
    run_error: str | None = None
    runs: list[RunSummary] = field(default_factory=list)
    runs_root: Path | None = None  # where runs and cross-validations are looked for
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
    return ReviewLog(default_log_path(None if source is None or source.synthetic
                                      else source.root))


# --------------------------------------------------------------------------- dataset checks


@st.cache_resource(show_spinner=False)
def _inspect_store() -> dict:
    return {}


def inspect_report(sk: SourceKey) -> dict | None:
    return _inspect_store().get(sk)


def run_inspect(sk: SourceKey, max_items: int | None) -> dict:
    rep = inspect_source(open_source_cached(sk), progress=False, max_items=max_items,
                         workers=2).to_dict()
    _inspect_store()[sk] = rep
    return rep


# --------------------------------------------------------------------------- duplicates


@st.cache_resource(show_spinner=False)
def _duplicates_store() -> dict:
    return {}


def duplicates_report(sk: SourceKey, rk: RunKey | None):
    return _duplicates_store().get((sk, rk))


def run_duplicates(c: Context):
    rep = duplicate_report(c.source, c.run_dir if c.run_key else None, progress=False)
    _duplicates_store()[(c.src_key, c.run_key)] = rep
    return rep
