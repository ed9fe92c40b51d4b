"""Evaluate a trained run on labelled data: `evaluate_run(run_dir, data)` writes metrics,
curves and example sets; `format_report` is the text `python -m model.evaluate` prints.

Inference is re-run from the run's weights (model.runs.load.load_run +
model.evaluation.inference), so the numbers are those of the chosen checkpoint and TTA, not the
ones recorded during training.
Files, written atomically into --out (default <run>/eval/valid or <run>/eval/<data name>):

    metrics.json      model.evaluation.metrics.summary + run, checkpoint, data, tta, synthetic flag
    predictions.csv   id, label, prob, loss, pred, correct (one row per patch, source order)
    roc.csv           fpr, tpr, threshold
    pr.csv            recall, precision, threshold
    calibration.csv   bin_lo, bin_hi, count, mean_prob, frac_pos (10 bins)
    samples.csv       set, id, label, prob, loss (16 per set: top_losses, confident_correct,
                      uncertain, false_negatives, random)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.atomic import write_csv, write_json
from model.core.errors import DataError, RunError
from model.data.open import open_source, reopen_source
from model.evaluation import metrics as M
from model.evaluation.ensemble import Ensemble, load_ensemble, predict_run
from model.evaluation.inference import check_tta
from model.runs.crossval import is_crossval
from model.runs.format import default_out_dir
from model.runs.load import load_run
from model.runs.summary import belongs_to

SAMPLES_K = 16


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    predictions: pd.DataFrame


def _validation_rows(loaded, run_dir: Path):
    """(source, indices, labels) of the run's own validation split."""

    path = run_dir / "valid_ids.csv"
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except FileNotFoundError:
        raise RunError(f"{run_dir} has no valid_ids.csv, so its validation split is unknown.",
                       path=path, fix="Pass --data with a labelled data set.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read ({e}).", path=path,
                       fix="Restore valid_ids.csv from the run, or pass --data.") from None
    if not {"id", "label"} <= set(df.columns) or df.empty:
        raise RunError(f"{path} needs columns id,label and at least one row.", path=path,
                       fix="Restore valid_ids.csv from the run, or pass --data.")
    desc = loaded.config.get("data") or {}
    try:
        source = reopen_source(desc, size=loaded.input.patch)
    except KeyError as e:
        raise RunError(f"config.json of {run_dir} does not say where its data is ({e}).",
                       path=run_dir / "config.json", fix="Pass --data.") from None
    indices = np.array([source.index_of(i) for i in df["id"]], dtype=np.int64)
    labels = pd.to_numeric(df["label"], errors="coerce").to_numpy()
    if np.isnan(labels).any() or not np.isin(labels, (0, 1)).all():
        raise RunError(f"{path} has labels other than 0/1.", path=path,
                       fix="Restore valid_ids.csv from the run.")
    return source, indices, labels.astype(np.int64)


def _training_overlap(loaded, run_dir: Path, source, ids: list[str], run_config: dict) -> int:
    """How many evaluated ids were training patches of the run (of any fold model of an
    ensemble; same data source only)."""
    if not belongs_to(run_config, source):
        return 0
    try:
        train_ids = (loaded.train_ids() if isinstance(loaded, Ensemble) else
                     set(pd.read_csv(run_dir / "train_ids.csv", dtype={"id": str})["id"]))
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return 0
    return sum(1 for i in ids if i in train_ids)


@dataclass
class _Rows:
    """The labelled patches an evaluation scores: where they are read, and how described."""

    source: object
    indices: np.ndarray | None  # rows of `source` (None: all of it, in order)
    labels: np.ndarray
    ids: list[str]
    desc: dict
    short: str


def _rows(loaded, run_dir: Path, data) -> _Rows:
    """data=None: the run's validation split (valid_ids.csv); else every patch of a labelled
    source."""
    if data is None:
        if isinstance(loaded, Ensemble):
            raise DataError(f"{run_dir} is a cross-validation: its fold models have no common "
                            "validation split (its out-of-fold predictions are in "
                            "oof_predictions.csv).",
                            fix=f"Evaluate the ensemble on held-out data: --data PATH, or "
                                f"one fold: python -m model.evaluate {run_dir}/fold-0")
        source, indices, labels = _validation_rows(loaded, run_dir)
        ids = [source.ids[i] for i in indices]
        desc = {**source.describe(), "subset": "valid_ids.csv", "source_n": len(source),
                "n": len(ids)}
        return _Rows(source, indices, labels, ids, desc,
                     f"validation split of the run: {source.describe_short()}, {len(ids)} rows")
    source = open_source(data, "train", size=loaded.input.patch)
    if not source.labelled:
        raise DataError(f"{source.describe_short()} has no labels, so it cannot be "
                        "evaluated; use model.predict for unlabelled data.",
                        fix=f"python -m model.predict {run_dir} --data {data}")
    return _Rows(source, None, source.labels.astype(np.int64), list(source.ids),
                 source.describe(), source.describe_short())


def _metrics(loaded, run_dir: Path, rows: _Rows, probs: np.ndarray, *, threshold: float,
             n_boot: int, target_sensitivity: float, tta: int, seconds: float) -> dict:
    """metrics.json: model.evaluation.metrics.summary plus where the numbers come from."""
    source = rows.source
    metrics = {
        **M.summary(rows.labels, probs, threshold=threshold, n_boot=n_boot,
                    target_sensitivity=target_sensitivity),
        "run": loaded.name,
        "run_dir": str(run_dir),
        "checkpoint": loaded.checkpoint,
        "checkpoint_mtime": loaded.checkpoint_mtime,
        "data": rows.desc,
        "data_description": rows.short,
        "tta": int(tta),
        "synthetic": bool(source.synthetic or loaded.synthetic),
        "synthetic_data": bool(source.synthetic),
        "trained_on_synthetic": bool(loaded.synthetic),
        "n_training_overlap": _training_overlap(loaded, run_dir, source, rows.ids,
                                                loaded.config),
        "inference_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if source.notes:
        metrics["data_notes"] = list(source.notes)
    return metrics


def load_model(run_dir: Path, checkpoint: str = "best"):
    """A run's model, or the ensemble of a cross-validation directory's fold models."""
    return load_ensemble(run_dir, checkpoint) if is_crossval(run_dir) else load_run(
        run_dir, checkpoint, lazy=True)  # built only if the engine needs the network


def _with_members(df: pd.DataFrame, labels: np.ndarray, members: np.ndarray
                  ) -> tuple[pd.DataFrame, dict]:
    """The prediction table with the fold models' probabilities and their spread, and the
    ensemble facts for metrics.json (each member's AUC on the same patches)."""
    df = df.copy()
    for k in range(members.shape[1]):
        df[f"p_fold{k}"] = members[:, k]
    df["fold_std"] = members.std(axis=1)
    aucs = [float(M.roc_auc(labels, members[:, k])) for k in range(members.shape[1])]
    return df, {"members": int(members.shape[1]), "member_auc": aucs,
                "mean_member_auc": float(np.mean(aucs)), "mean_fold_std":
                float(df["fold_std"].mean())}


def _write_outputs(out_dir: Path, df: pd.DataFrame, labels: np.ndarray, probs: np.ndarray,
                   metrics: dict, threshold: float) -> None:
    """The data files first and metrics.json last: a directory with a metrics.json is
    complete."""
    sets = M.sample_sets(df[["id", "label", "prob", "loss"]], k=SAMPLES_K, threshold=threshold)
    samples = pd.concat([s.assign(set=name) for name, s in sets.items()], ignore_index=True)
    cal, _ = M.calibration(labels, probs)
    write_csv(out_dir / "predictions.csv", df)
    write_csv(out_dir / "roc.csv", M.roc_points(labels, probs))
    write_csv(out_dir / "pr.csv", M.pr_points(labels, probs))
    write_csv(out_dir / "calibration.csv", cal)
    write_csv(out_dir / "samples.csv", samples[["set", "id", "label", "prob", "loss"]])
    write_json(out_dir / "metrics.json", metrics)


def evaluate_run(run_dir, data=None, out=None, *, checkpoint: str = "best",
                 threshold: float = 0.5, tta: int = 1, target_sensitivity: float = 0.95,
                 n_boot: int = 1000, progress=True, batch_size: int = 256,
                 precision: str = "auto", compile: bool = False,
                 backend: str = "eager") -> EvalResult:
    """Re-run inference of `run_dir` on labelled data and write the evaluation files.

    data=None: the run's own validation split (valid_ids.csv, labels from there); otherwise
    any labelled source that model.data.open.open_source understands."""
    check_tta(tta)
    if not 0.0 <= float(threshold) <= 1.0:
        raise DataError(f"threshold must be in [0, 1]; got {threshold}.")
    run_dir = Path(run_dir)
    loaded = load_model(run_dir, checkpoint)
    rows = _rows(loaded, run_dir, data)
    out_dir = Path(out) if out is not None else default_out_dir(run_dir, data)
    t0 = time.time()
    kw = dict(tta=tta, indices=rows.indices, progress=progress, batch_size=batch_size,
              precision=precision, compile=compile, backend=backend)
    pred = predict_run(loaded, rows.source, **kw)
    probs, members = pred.probs, pred.members
    seconds = time.time() - t0
    df = M.prediction_table(rows.ids, rows.labels, probs, threshold)
    metrics = _metrics(loaded, run_dir, rows, probs, threshold=threshold, n_boot=n_boot,
                       target_sensitivity=target_sensitivity, tta=tta, seconds=seconds)
    metrics["engine"] = pred.engine
    if members is not None:
        df, metrics["ensemble"] = _with_members(df, rows.labels, members)
    _write_outputs(out_dir, df, rows.labels, probs, metrics, threshold)
    return EvalResult(out_dir=out_dir, metrics=metrics, predictions=df)


# --------------------------------------------------------------------------- CLI


def format_report(res: EvalResult) -> str:
    m = res.metrics
    c = m["confusion"]
    tag = "  [SYNTHETIC]" if m.get("synthetic") else ""
    lo, hi = m["auc_ci"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    ts = m["threshold_for_sensitivity"]
    lines = [
        f"Run {m['run']} ({m['checkpoint']}), TTA x{m['tta']}{tag}",
        f"Data: {m['data_description']}",
        f"  n = {m['n']} ({m['n_pos']} tumour, {m['n_neg']} no tumour)",
        f"  ROC AUC   {m['auc']:.4f}  (95% CI {lo:.4f}-{hi:.4f}, bootstrap)",
        f"  accuracy  {m['accuracy']:.4f} at threshold {m['threshold']:g}",
        f"  confusion at {m['threshold']:g}:        pred 0   pred 1",
        f"    label 0 (no tumour)   {c['tn']:>8d} {c['fp']:>8d}",
        f"    label 1 (tumour)      {c['fn']:>8d} {c['tp']:>8d}",
        f"  sensitivity {pct(c['sensitivity'])}, specificity {pct(c['specificity'])}, "
        f"precision {pct(c['precision'])}",
        f"  for sensitivity >= {ts['target']:g}: threshold {ts['threshold']:.4f} "
        f"(sensitivity {pct(ts['sensitivity'])}, specificity {pct(ts['specificity'])})",
        f"  ECE {m['ece']:.4f}, Brier {m['brier']:.4f}, average precision "
        f"{m['average_precision']:.4f}",
    ]
    if m.get("n_training_overlap"):
        lines.append(f"  WARNING: {m['n_training_overlap']} of these patches were used to train "
                     "this run; the numbers are optimistic.")
    if m.get("synthetic"):
        what = ("the data is" if m.get("synthetic_data") else "the run was trained on")
        lines.append(f"  SYNTHETIC: {what} the built-in synthetic set; these numbers say nothing "
                     "about real tissue.")
    lines.append(f"Files: {res.out_dir}/ (metrics.json, predictions.csv, roc.csv, pr.csv, "
                 "calibration.csv, samples.csv)")
    return "\n".join(lines)
