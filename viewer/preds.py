"""Predictions and Grad-CAM for the pages, cached per run + checkpoint time + source.

- the run's validation predictions (valid_predictions.csv) are there at once;
- whole-source predictions are computed on demand: labelled data through model.evaluate (files
  in <run>/eval/<data name>/, reused after a restart, also those made with the CLI), other
  data in memory for this process;
- Grad-CAM maps are st.cache_data'd per (run, checkpoint time, source, patch, layer, class).
The model is shared read-only; inference and Grad-CAM run under one lock.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from model.core.errors import PcamLensError
from model.data.open import reopen_source
from model.evaluation.embeddings import Embeddings, embedding_map, load_embeddings
from model.evaluation.evaluate import evaluate_run
from model.evaluation.inference import engine_for, predict_arrays, predict_probs
from model.evaluation.metrics import complete_prediction_table, prediction_table
from model.nets.gradcam import gradcam, gradcam_layers
from model.nets.gradcam import overlay as gradcam_overlay
from model.runs.crossval import CrossVal, find_crossvals, read_oof, view_columns
from model.runs.format import read_config
from model.runs.summary import belongs_to, find_evaluation
from viewer.state import (
    Context,
    RunKey,
    SourceKey,
    loaded,
    open_source_cached,
    run_csv,
    runs_root,
)

MODEL_LOCK = threading.RLock()
_MEMO_LOCK = threading.Lock()
# what out-of-fold predictions add to a patch's row (model.runs.crossval)
OOF_EXTRA = ("fold", "tta_spread", "label_quality", "suggested_label", "label_issue",
             "issue_rank")


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
    warning: str | None = None
    out_of_fold: bool = False  # every prob comes from a model that never trained on the patch
    origin_run: str = ""  # the run or cross-validation the predictions are from


@st.cache_resource(show_spinner=False)
def _memo_store() -> dict:
    return {}


def _memo(key: tuple, make, keep: int = 8):
    """Process-wide memo of shared read-only objects (big frames are not copied per rerun,
    unlike st.cache_data)."""
    store = _memo_store()
    with _MEMO_LOCK:
        if key in store:
            return store[key]
    value = make()
    with _MEMO_LOCK:
        while len(store) >= keep:
            store.pop(next(iter(store)))
        store[key] = value
    return value


def _finish(df: pd.DataFrame, source) -> pd.DataFrame:
    """The prediction table (model.evaluation.metrics) plus `idx`, the patch's row in `source`
    where its pixels are read (-1 when absent)."""
    df = complete_prediction_table(df)
    df["idx"] = (pd.Index(source.ids).get_indexer(df["id"]) if source is not None
                 else np.full(len(df), -1))
    return df


@st.cache_resource(max_entries=2, show_spinner="Opening the run's data...")
def _run_source(desc_json: str):
    return reopen_source(json.loads(desc_json))


def validation_predictions(c: Context) -> Predictions | None:
    """The run's valid_predictions.csv, with pixels from the sidebar source when it is the
    run's data, else from the run's data re-opened (None pixels when that fails)."""

    df = run_csv(c.run_dir, "valid_predictions.csv")
    if df is None or not {"id", "prob"} <= set(df.columns):
        return None
    cfg = read_config(c.run_dir)
    source = c.source if c.source is not None and belongs_to(cfg, c.source) else None
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
    key = (c.run_key, c.src_key, 1)  # (RunKey, SourceKey, TTA views)
    df = _store().get(key)
    if df is not None:
        return Predictions(df, f"all {len(df):,} patches of {c.source.describe_short()} "
                               f"(run {c.run_name})", c.source, True, ("source",) + key)
    return evaluated_predictions(c)


def _evaluable(c: Context) -> bool:
    """Whole-source predictions of labelled training data go through model.evaluate."""
    return c.source is not None and c.source.labelled and c.src_key.split == "train"


def evaluated_predictions(c: Context) -> Predictions | None:
    if not _evaluable(c):
        return None
    ev = find_evaluation(c.run_dir, c.src_key.spec, c.source, c.run_key.mtime)
    df = run_csv(ev.out_dir, "predictions.csv") if ev is not None else None
    if df is None or not {"id", "label", "prob"} <= set(df.columns):
        return None
    token = ("eval", str(ev.out_dir), ev.predictions_csv.stat().st_mtime, c.src_key)
    warning = (f"{ev.training_overlap:,} of these patches were training patches of run "
               f"{c.run_name}: metrics on them are optimistic." if ev.training_overlap else None)
    return Predictions(_memo(token, lambda: _finish(df, c.source)),
                       f"all {len(df):,} patches of {c.source.describe_short()}, evaluated "
                       f"with run {c.run_name}, TTA ×{ev.tta} (files in {ev.out_dir})",
                       c.source, True, token, warning)


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    """Whole-source predictions computed in this process: (run_key, src_key, tta) -> df."""
    return {}


def predict_source(rk: RunKey, sk: SourceKey, tta: int = 1, progress=None) -> pd.DataFrame:
    """Predict every patch of a source (on demand: can take long); kept for this process."""
    store = _store()
    if (rk, sk, tta) in store:
        return store[(rk, sk, tta)]
    src = open_source_cached(sk)
    with MODEL_LOCK:
        run = loaded(rk)
        # the same engine choice as model.predict: ONNX Runtime for a large CPU job
        engine = engine_for(run, len(src), tta=tta, backend="auto")
        probs = predict_probs(run, src, tta=tta, batch_size=128, progress=progress or False,
                              engine=engine)
    df = _finish(prediction_table(src.ids, src.labels, probs), src)
    df.attrs["engine"] = engine.choice.to_dict()
    with _MEMO_LOCK:
        while len(store) >= 6:
            store.pop(next(iter(store)))
        store[(rk, sk, tta)] = df
    return df


def compute_source_predictions(c: Context, progress=None) -> Predictions:
    """Predict the whole sidebar source. Labelled data goes through model.evaluate, so the
    predictions and metrics are also written to <run>/eval/<data name>/ and reused after a
    restart; unlabelled data is predicted in memory."""
    if _evaluable(c):
        evaluate_run(c.run_dir, data=c.src_key.spec, checkpoint=c.run_key.checkpoint,
                     progress=progress or False, backend="auto")
        p = evaluated_predictions(c)
        if p is not None:
            return p
    predict_source(c.run_key, c.src_key, 1, progress)
    return source_predictions(c)


def crossval_for(c: Context) -> CrossVal | None:
    """The newest complete cross-validation under the runs folder made on the sidebar's
    labelled source (its out-of-fold predictions cover every labelled patch)."""
    if c.source is None or c.src_key is None or not c.source.labelled:
        return None
    found = find_crossvals(c.runs_root or runs_root(c.settings), c.source)
    return found[0] if found else None


def oof_predictions(c: Context) -> Predictions | None:
    """The out-of-fold predictions of the chosen source (model.crossval), when there are."""
    cv = crossval_for(c)
    if cv is None:
        return None
    token = ("oof", str(cv.dir), cv.oof_path.stat().st_mtime, c.src_key)
    df = _memo(token, lambda: _finish(read_oof(cv, c.source), c.source))
    return Predictions(df, f"out-of-fold predictions of all {len(df):,} labelled patches "
                           f"(cross-validation {cv.name}: {cv.k} folds, each patch predicted "
                           f"by the model that did not train on it, TTA ×"
                           f"{cv.metrics.get('views', 8)})", c.source, True, token,
                       out_of_fold=True, origin_run=cv.name)


def best_predictions(c: Context) -> Predictions | None:
    """Out-of-fold predictions of the source when a cross-validation made them, else
    whole-source predictions of the run when computed, else its validation predictions."""
    oof = oof_predictions(c)
    if oof is not None:
        return oof
    if c.run_dir is None or c.run_key is None:
        return None
    return source_predictions(c) or validation_predictions(c)


@st.cache_data(max_entries=64, show_spinner=False)
def page_probs(rk: RunKey, sk: SourceKey, indices: tuple[int, ...]) -> np.ndarray:
    """Predictions for just the patches on screen (cached per run, checkpoint time, source)."""
    src = open_source_cached(sk)
    return predict_page(rk, src.read_batch(list(indices)))


def predict_page(rk: RunKey, x: np.ndarray, tta: int = 1) -> np.ndarray:
    """A page of patches: eager PyTorch (a graph session per page would cost more than it
    saves)."""
    with MODEL_LOCK:
        return np.asarray(predict_arrays(loaded(rk), x, tta), np.float64)


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
            for col in ("prob", "loss", "pred", "correct", *OOF_EXTRA, *view_columns(p)):
                if col in p.columns:
                    t[col] = p[col].reindex(t.index)
        else:
            for col in ("prob", "loss", "pred", "correct"):
                t[col] = np.nan
        return t

    return _memo(("table", c.src_key, preds.token if usable else None), make), preds


@st.cache_data(max_entries=16, show_spinner=False)
def gradcam_layer_names(rk: RunKey) -> list[str]:
    with MODEL_LOCK:
        return list(gradcam_layers(loaded(rk)))


@st.cache_data(max_entries=64, show_spinner="Computing Grad-CAM...")
def gradcam_heats(rk: RunKey, sk: SourceKey, patch_ids: tuple, layer: str, target: int | None
                  ) -> np.ndarray:
    """Heat maps [n,96,96] of a gallery of patches, computed in one batch."""
    src = open_source_cached(sk)
    x = src.read_batch([src.index_of(pid) for pid in patch_ids])
    return gradcam_arrays(rk, x, layer, target)


@st.cache_data(max_entries=512, show_spinner=False)
def gradcam_heat(rk: RunKey, sk: SourceKey, patch_id: str, layer: str, target: int | None
                 ) -> np.ndarray:
    """Heat map [96,96] in 0..1 of one patch of a source (cached per run, checkpoint time,
    source, patch, layer and class)."""
    src = open_source_cached(sk)
    x = src.read_batch([src.index_of(patch_id)])
    return gradcam_arrays(rk, x, layer, target)[0]


def gradcam_arrays(rk: RunKey, x: np.ndarray, layer: str, target: int | None) -> np.ndarray:
    with MODEL_LOCK:
        return np.asarray(gradcam(loaded(rk), x, layer=layer, target=target), np.float32)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    return gradcam_overlay(rgb, heat, alpha)


# --------------------------------------------------------------------------- embeddings


def embeddings(c: Context) -> Embeddings | None:
    """The run's cached embeddings of the sidebar source (None until computed)."""
    if c.run_key is None or c.source is None:
        return None
    key = ("emb", c.run_key, c.src_key)
    store = _memo_store()
    if key in store:
        return store[key]
    with MODEL_LOCK:
        emb = load_embeddings(loaded(c.run_key), c.source)
    if emb is not None:
        _memo(key, lambda: emb)
    return emb


def map_xy(c: Context, emb: Embeddings, method: str) -> np.ndarray:
    return _memo(("map", c.run_key, c.src_key, method), lambda: embedding_map(emb, method))
