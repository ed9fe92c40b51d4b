"""Predictions for unlabelled patches in Kaggle submission form (id,label = P(tumour)), and
the merge of sharded part files: `predict_source`, `merge_parts`, `parse_shard`. The command
line around them is model/predict.py.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.errors import DataError
from model.data.open import open_source
from model.evaluation.ensemble import predict_run
from model.evaluation.evaluate import load_model
from model.evaluation.inference import check_tta, shard_indices


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise DataError(f"--shard {text!r} is not RANK/WORLD.", fix="Use e.g. --shard 0/4.")
    rank, world = int(m.group(1)), int(m.group(2))
    if world < 1 or rank >= world:
        raise DataError(f"--shard {text}: need 0 <= RANK < WORLD.",
                        fix="Shards of 4 are 0/4, 1/4, 2/4 and 3/4.")
    return rank, world


def _submission(ids, probs) -> pd.DataFrame:
    return pd.DataFrame({"id": list(ids), "label": np.asarray(probs, np.float64)})


def predict_source(run_dir, data, *, tta: int = 1, batch_size: int = 256,
                   checkpoint: str = "best", shard: tuple[int, int] | None = None,
                   precision: str = "auto", progress=True, compile: bool = False,
                   backend: str = "eager"):
    """(loaded run, source, DataFrame id,label[,index], record) for the test split at `data`;
    the record (for the file beside the submission) says what ran: engine, TTA, seconds."""

    check_tta(tta)
    loaded = load_model(run_dir, checkpoint)
    source = open_source(data, split="test", size=loaded.input.patch)
    indices = None if shard is None else shard_indices(len(source), *shard)
    kw = dict(tta=tta, batch_size=batch_size, indices=indices, progress=progress,
              precision=precision, compile=compile, backend=backend)
    t0 = time.perf_counter()
    pred = predict_run(loaded, source, **kw)  # a cross-validation directory: the folds' mean
    record = {"run": str(run_dir), "checkpoint": loaded.checkpoint, "data": str(data),
              "n": len(pred.probs), "tta": int(tta), "shard": list(shard) if shard else None,
              "engine": pred.engine, "seconds": round(time.perf_counter() - t0, 2),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if indices is None:
        return loaded, source, _submission(source.ids, pred.probs), record
    df = _submission([source.ids[i] for i in indices], pred.probs)
    df["index"] = indices
    return loaded, source, df, record


def _describe_ids(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _ranges(idx: np.ndarray) -> str:
    """'3-7, 12' for sorted unique indices."""
    if len(idx) == 0:
        return ""
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = i
        prev = i
    out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out[:10]) + (", ..." if len(out) > 10 else "")


def read_part(path: Path) -> pd.DataFrame:
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except FileNotFoundError:
        raise DataError(f"Part file {path} does not exist.", path=path,
                        fix="Run the missing shard with --shard RANK/WORLD first.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"Part file {path} cannot be read ({e}).", path=path,
                        fix="Run that shard again.") from None
    missing = [c for c in ("id", "label", "index") if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; a part file has id,label,index.",
                        path=path, fix="Pass the files written with --shard.")
    idx = pd.to_numeric(df["index"], errors="coerce")
    prob = pd.to_numeric(df["label"], errors="coerce")
    if idx.isna().any() or (idx % 1 != 0).any():
        raise DataError(f"{path}: the index column has non-integer values.", path=path,
                        fix="Run that shard again.")
    if prob.isna().any() or not np.isfinite(prob).all() or (prob < 0).any() or (prob > 1).any():
        raise DataError(f"{path}: the label column must hold probabilities in [0, 1].",
                        path=path, fix="Run that shard again.")
    return pd.DataFrame({"id": df["id"].astype(str), "label": prob.astype(np.float64),
                         "index": idx.astype(np.int64), "part": str(path)})


def merge_parts(parts: list[Path], source) -> pd.DataFrame:
    """The submission (id,label in source order) from shard part files; DataError naming the
    missing / duplicate / foreign ids when the parts do not cover the source exactly once."""
    if not parts:
        raise DataError("--merge needs at least one part file.")
    df = pd.concat([read_part(p) for p in parts], ignore_index=True)
    n = len(source)
    out_of_range = df[(df["index"] < 0) | (df["index"] >= n)]
    if len(out_of_range):
        bad = _describe_ids(list(out_of_range["id"]))
        raise DataError(f"{len(out_of_range)} rows of the parts have indices outside 0..{n - 1} "
                        f"of {source.describe_short()} (ids {bad}); the parts were made for "
                        "other data.",
                        fix="Merge with the same --data the shards were predicted on.")
    expected = np.asarray(source.ids, dtype=object)[df["index"].to_numpy()]
    wrong = df[expected != df["id"].to_numpy(dtype=object)]
    if len(wrong):
        raise DataError(f"{len(wrong)} rows of the parts name ids that do not match "
                        f"{source.describe_short()} at their index (e.g. "
                        f"{_describe_ids(list(wrong['id']), 5)}).",
                        fix="Merge with the same --data the shards were predicted on.")
    counts = np.bincount(df["index"].to_numpy(), minlength=n)
    dup = np.flatnonzero(counts > 1)
    if len(dup):
        files = sorted(set(df.loc[df["index"].isin(dup), "part"]))
        raise DataError(f"{len(dup)} ids appear more than once in the parts: "
                        f"{_describe_ids([source.ids[i] for i in dup])} (in {', '.join(files)}).",
                        fix="Pass each shard's part file once, and shards of one --shard "
                            "RANK/WORLD split.")
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise DataError(f"{len(missing)} of {n} ids are missing from the parts: "
                        f"{_describe_ids([source.ids[i] for i in missing])} (indices "
                        f"{_ranges(missing)}).",
                        fix="Predict the missing shard(s) with --shard RANK/WORLD and merge "
                            "all part files.")
    df = df.sort_values("index", kind="mergesort")
    return _submission(df["id"], df["label"])


def metadata_path(out: Path) -> Path:
    """The record beside a submission (CSVW's naming: submission.csv-metadata.json): the CSV
    itself stays Kaggle's id,label."""
    out = Path(out)
    return out.with_name(out.name + "-metadata.json")


def _summary(df: pd.DataFrame, out: Path, extra: str = "") -> str:
    p = df["label"].to_numpy(np.float64)
    return (f"{len(p)} patches{extra}: mean P(tumour) {p.mean():.4f}, "
            f"{(p >= 0.5).mean() * 100:.1f}% >= 0.5. Written: {out}")


# --------------------------------------------------------------------------- CLI
