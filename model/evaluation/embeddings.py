"""A run's embeddings of a source: a 2-D map, similar patches and near-duplicates.

    emb = embed_run(load_run("runs/<name>"), source)          # computed once, then cached
    emb.similar(i, k=8)                                       # (rows, cosine) of the nearest
    xy = embedding_map(emb, "umap")                           # [n, 2], cached beside

The embedding of a patch is what the run's head sees: the pooled body features
(model.evaluation.features, optionally averaged over the TTA views). They are cached per
(run weights, input transform, source ids, views) under <run>/embeddings/, so a retrained
checkpoint or other data never reuses a stale cache. For search and maps a PCA-reduced copy is
kept (`REDUCED_DIM` components fitted on a sample of at most `PCA_SAMPLE` patches, rows
L2-normalised: a dot product is the cosine), computed in chunks, so memory stays bounded by
the chunk for any size of source:

    <run>/embeddings/features-<key>.f16 / .json    the float16 features (resumable)
    <run>/embeddings/<key>/reduced.npy             [n, REDUCED_DIM] float32, unit rows
    <run>/embeddings/<key>/map-<method>.npy        [n, 2] float32 (umap or pca)
    <run>/embeddings/<key>/meta.json               what it was made from, timings
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Polygon

from model.core.atomic import atomic_open, write_json
from model.core.errors import DataError, PcamLensError
from model.data.base import PatchSource
from model.evaluation.engine import build_engine
from model.evaluation.features import cache_key, cached_features

REDUCED_DIM = 64
PCA_SAMPLE = 20_000
CHUNK = 8192
MAP_METHODS = ("umap", "pca")
MIN_UMAP = 20  # below this UMAP has too few neighbours to mean anything


@dataclass
class Embeddings:
    """Unit-norm reduced embeddings [n, d] of a source, row i = source row i."""

    dir: Path
    ids: list[str]
    vectors: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.ids)

    def similar(self, i: int, k: int = 8, exclude_self: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosine) of the k rows most similar to row i, most similar first (exact:
        one matrix-vector product)."""
        cos = self.vectors @ self.vectors[int(i)]
        k = min(k + int(exclude_self), len(cos))
        top = np.argpartition(-cos, k - 1)[:k]
        top = top[np.lexsort((top, -cos[top]))]
        if exclude_self:
            top = top[top != int(i)][:k - 1]
        return top, cos[top]


def _key_dir(run_dir: Path, key: dict) -> Path:
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run_dir) / "embeddings" / h


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _mean_views(feats: np.ndarray, rows: slice) -> np.ndarray:
    return np.asarray(feats[rows], np.float32).mean(axis=1)


def _reduce(feats: np.ndarray) -> tuple[np.ndarray, dict]:
    """PCA fitted on a seeded sample, applied in chunks; rows normalised to unit length."""
    from sklearn.decomposition import PCA  # seconds to import: only here

    n = len(feats)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, PCA_SAMPLE), replace=False))
    x = np.asarray(feats[sample], np.float32).mean(axis=1)
    dim = int(min(REDUCED_DIM, x.shape[0], x.shape[1]))
    pca = PCA(n_components=dim, svd_solver="randomized" if dim < min(x.shape) else "full",
              random_state=0).fit(x)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, CHUNK):
        z = pca.transform(_mean_views(feats, slice(s, s + CHUNK))).astype(np.float32)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        out[s:s + len(z)] = z
    return out, {"dim": dim, "pca_sample": len(sample),
                 "explained_variance": float(pca.explained_variance_ratio_.sum())}


def _read_fresh(d: Path, key: dict, ids: list[str]) -> Embeddings | None:
    try:
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("key") != key:
            return None
        vectors = np.load(d / "reduced.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None  # missing or truncated: recomputed by embed_run
    if vectors.shape[0] != key["n"]:
        return None
    return Embeddings(d, ids, np.asarray(vectors), meta)


def load_embeddings(loaded, source: PatchSource, views: int = 1) -> Embeddings | None:
    """The cached embeddings of this run's checkpoint on `source`, or None (never computes)."""
    key = cache_key(loaded.model, loaded.input, source, views)
    return _read_fresh(_key_dir(loaded.run_dir, key), key, list(source.ids))


def embed_run(loaded, source: PatchSource, *, views: int = 1, batch_size: int = 256,
              progress=True, log=None, backend: str = "auto") -> Embeddings:
    """Compute (or reuse) the run's embeddings of every patch of `source`; the features go
    through the inference engine (`backend`: model.evaluation.engine, part "features")."""
    if len(source) < 2:
        raise DataError(f"{source.describe_short()} has {len(source)} patch(es); an embedding "
                        "map needs at least 2.", fix="Choose a larger data source.")
    key = cache_key(loaded.model, loaded.input, source, views)
    d = _key_dir(loaded.run_dir, key)
    emb = _read_fresh(d, key, list(source.ids))
    if emb is not None:
        return emb
    t0 = time.time()
    built = []

    def make_engine():  # only when features must be computed (not when cached)
        built.append(build_engine(loaded, backend=backend, passes=len(source) * views,
                                  part="features"))
        return built[-1]

    feats = cached_features(loaded.model, loaded.input, source, d.parent, views=views,
                            batch_size=batch_size, progress=progress, log=log,
                            make_engine=make_engine)
    t1 = time.time()
    vectors, info = _reduce(feats)
    d.mkdir(parents=True, exist_ok=True)
    _save_npy(d / "reduced.npy", vectors)
    meta = {"key": key, "run": loaded.name, "checkpoint": loaded.checkpoint,
            "source": source.describe_short(), "n": len(source), "views": views, **info,
            "engine": built[-1].choice.to_dict() if built else "features cached earlier",
            "seconds": {"features": round(t1 - t0, 1), "pca": round(time.time() - t1, 1)}}
    write_json(d / "meta.json", meta)
    return Embeddings(d, list(source.ids), vectors, meta)


def embedding_map(emb: Embeddings, method: str = "umap", seed: int = 0, log=None
                  ) -> np.ndarray:
    """[n, 2] layout of the embeddings: UMAP (cosine on the PCA copy) or the first two
    principal components; cached beside the embeddings."""
    if method not in MAP_METHODS:
        raise DataError(f"Unknown map method {method!r}.", fix="Use umap or pca.")
    path = emb.dir / f"map-{method}.npy"
    try:
        xy = np.load(path, allow_pickle=False)
        if xy.shape == (len(emb), 2):
            return xy
    except (OSError, ValueError):
        pass  # missing or truncated: computed again
    t0 = time.time()
    if method == "pca" or len(emb) < MIN_UMAP:
        if method == "umap" and log:
            log(f"{len(emb)} patches are too few for UMAP (needs {MIN_UMAP}); using PCA.")
        xy = np.ascontiguousarray(emb.vectors[:, :2], np.float32)
    else:
        xy = _umap(emb.vectors, seed)
    _save_npy(path, xy)
    meta = dict(emb.meta)
    meta.setdefault("seconds", {})[f"map_{method}"] = round(time.time() - t0, 1)
    write_json(emb.dir / "meta.json", meta)
    emb.meta = meta
    return xy


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap  # numba compiles on first use: only here
    except ImportError:
        raise PcamLensError("umap-learn is not installed; the UMAP map needs it.",
                            fix="pip install -r requirements.txt, or use the PCA map "
                                "(--method pca).") from None
    reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, metric="cosine",
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(x).astype(np.float32)


def near_duplicate_pairs(emb: Embeddings, threshold: float = 0.98, block: int = 2048
                         ) -> np.ndarray:
    """[m, 3] (i, j, cosine) with i < j for every pair of rows above `threshold`, found with
    exact blockwise products (memory: block x n)."""
    pairs = []
    v = emb.vectors
    for s in range(0, len(v), block):
        cos = v[s:s + block] @ v.T
        i, j = np.nonzero(cos >= threshold)
        i = i + s
        keep = i < j
        pairs.append(np.stack([i[keep], j[keep], cos[i[keep] - s, j[keep]]], axis=1))
    return np.concatenate(pairs) if pairs else np.empty((0, 3))


def rows_in_region(xy: np.ndarray, box: tuple[tuple[float, float], tuple[float, float]]
                   | None = None, lasso: tuple[list[float], list[float]] | None = None
                   ) -> np.ndarray:
    """Rows of the map inside a box ((x0, x1), (y0, y1)) or a lasso polygon (xs, ys): a
    selection made on a drawn sample of the points applies to all of them."""
    if box is not None:
        (x0, x1), (y0, y1) = (sorted(box[0]), sorted(box[1]))
        inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
        return np.flatnonzero(inside)
    if lasso is not None and len(lasso[0]) >= 3:
        return np.flatnonzero(Polygon(np.column_stack(lasso)).contains_points(xy))
    return np.zeros(0, np.int64)
