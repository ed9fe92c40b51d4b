"""Pooled features of every patch of a source under the dihedral TTA views, cached on disk.

    feats = cached_features(model, input_cfg, source, cache_dir, views=8)
    feats.shape  # [n, 8, F] float16, memory-mapped: view k of patch i is feats[i, k]

The features are the network's body output pooled as its fastai head pools it
(AdaptiveConcatPool2d + Flatten: average and max, 2 x channels), so the rest of the head
(`head_after_pool`) turns them into the same logits as the whole network. Cross-validation
computes them once and fits a head per fold on them; the embedding map uses them too.

The cache is one raw float16 file `features-<key>.f16` (np.memmap, [n, views, F]) and its
`features-<key>.json` (what the features depend on, how many rows are done). The key is a
digest of the body's weights, the input transform, the source's ids and the number of views,
so a cache made for other weights or other data is never reused. Rows are written in chunks;
the JSON is rewritten atomically after each chunk is flushed, so a killed computation resumes
at the last finished chunk and never reads half-written rows as done. Memory is bounded by
the batch size.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from model.core.atomic import storage_error, write_json
from model.core.errors import DataError
from model.data.base import PatchSource, ids_fingerprint
from model.data.batches import iter_batches
from model.evaluation.engine import Engine, eager_engine
from model.nets.archs import pooled_part
from model.nets.transforms import InputConfig, batch_views, prepare

FORMAT = "pcam-lens-features"
FORMAT_VERSION = 1
CHUNK_ROWS = 1024  # rows between two commits of the progress JSON
F16_MAX = float(np.finfo(np.float16).max)


def head_after_pool(model: nn.Sequential) -> nn.Sequential:
    """The part of the fastai head after pooling: features -> logits."""
    return model[1][2:]


def pooled(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """[B, F] pooled body features of a prepared input batch (what the head sees)."""
    return pooled_part(model)(x)


def weights_digest(module: nn.Module) -> str:
    """sha1 of a module's parameters and buffers (names, shapes, values): the features depend
    on exactly these."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model: nn.Sequential, input_cfg: InputConfig, source: PatchSource,
              views: int) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "body": weights_digest(model[0]), "input": input_cfg.to_dict(),
            "ids": ids_fingerprint(source.ids), "n": len(source), "views": int(views)}


def _paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"features-{h}.f16", cache_dir / f"features-{h}.json"


def _read_meta(path: Path, key: dict) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("key") == key else None


def _open_data(path: Path, shape: tuple[int, ...], resume: bool) -> np.memmap:
    """The float16 array file, created at full size (sparse) unless resuming a good one."""
    want = int(np.prod(shape)) * 2
    if not (resume and path.exists() and path.stat().st_size == want):
        with open(path, "wb") as f:
            f.truncate(want)
    return np.memmap(path, dtype=np.float16, mode="r+", shape=shape)


def feature_dim(model: nn.Sequential, input_cfg: InputConfig) -> int:
    with torch.inference_mode():
        x = torch.zeros(1, 3, input_cfg.size, input_cfg.size)
        was = model.training
        model.eval()
        try:
            return int(pooled(model, x).shape[1])
        finally:
            model.train(was)


def cached_features(model: nn.Sequential, input_cfg: InputConfig, source: PatchSource,
                    cache_dir: str | os.PathLike, *, views: int = 8, batch_size: int = 128,
                    precision: str = "auto", progress=True, log=None,
                    make_engine: Callable[[], Engine] | None = None) -> np.memmap:
    """[n, views, F] float16 pooled features of every patch of `source` (read-only memmap),
    computed with `model` in eval mode, or read from / resumed in `cache_dir`.
    `make_engine`: builds a features engine (model.evaluation.engine.build_engine with
    part="features", e.g. ONNX Runtime) to compute them with instead of `model` in eager
    PyTorch; called only when there is something to compute."""
    if not 1 <= views <= 8:
        raise DataError(f"views must be 1..8 dihedral views; got {views}.")
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = storage_error(e, cache_dir)
        if err is None:
            raise
        raise err from None
    key = cache_key(model, input_cfg, source, views)
    data_path, meta_path = _paths(cache_dir, key)
    n = len(source)
    shape = (n, views, feature_dim(model, input_cfg))
    meta = _read_meta(meta_path, key)
    done = int(meta["rows_done"]) if meta else 0
    if meta and meta.get("complete") and data_path.exists() and \
            data_path.stat().st_size == int(np.prod(shape)) * 2:
        return np.memmap(data_path, dtype=np.float16, mode="r", shape=shape)
    if done and log:
        log(f"Features: resuming after {done:,} of {n:,} patches ({data_path.name})")
    arr = _open_data(data_path, shape, resume=done > 0)
    if done and arr.shape != shape:
        done = 0
    engine = make_engine() if make_engine is not None else None
    _compute(model, input_cfg, source, arr, done, views, batch_size, precision, progress, engine,
             lambda rows, complete: write_json(meta_path, {
                 "key": key, "shape": list(shape), "dtype": "float16", "rows_done": rows,
                 "complete": complete, "updated": time.time()}))
    del arr
    return np.memmap(data_path, dtype=np.float16, mode="r", shape=shape)


def _compute(model, input_cfg: InputConfig, source: PatchSource, arr: np.memmap, start: int,
             views: int, batch_size: int, precision: str, progress, engine: Engine | None,
             commit) -> None:
    n = len(source)
    engine = engine or eager_engine(pooled_part(model), precision)
    was = model.training
    model.eval()
    rest = source.subset(np.arange(start, n)) if start else source
    bar = tqdm(total=n, initial=start, desc="features", unit="patch", file=sys.stderr,
               disable=None if progress is True else True, leave=False)
    since = 0
    try:
        with torch.inference_mode():
            for s, xb in iter_batches(rest, batch_size, workers=0):
                x = prepare(xb.to(engine.device), input_cfg)
                for k, xv in enumerate(batch_views(x, views)):
                    with engine.autocast():
                        f = engine.model(xv).float()
                    arr[start + s:start + s + len(f), k] = (
                        f.clamp_(-F16_MAX, F16_MAX).cpu().numpy().astype(np.float16))
                since += len(xb)
                bar.update(len(xb))
                if callable(progress):
                    progress(start + s + len(xb), n)
                if since >= CHUNK_ROWS:
                    arr.flush()
                    commit(start + s + len(xb), False)
                    since = 0
        arr.flush()
        commit(n, True)
    finally:
        bar.close()
        model.train(was)
