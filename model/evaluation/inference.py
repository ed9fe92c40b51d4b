"""Batched inference of a trained run: P(class index 1) for every patch of a source or array.

    from model.data.open import open_source
        from model.runs.load import load_run

    loaded = load_run("runs/<name>")
    probs = predict_probs(loaded, open_source("../shared/data/pcam-sample", "test"), tta=8)

The hot loop moves uint8 batches only (model.data.batches.iter_batches: ordered, bounded
memory, loader workers decode while the model runs), applies the evaluation transform
`model.nets.transforms.prepare` to the whole batch, and runs the network through an engine
(model.evaluation.engine: eager PyTorch in channels_last with bf16 autocast on CPUs that have
native bf16 and on CUDA, torch.compile, or ONNX Runtime; `engine_for` chooses by job size, and
`engine.choice` records what ran) under `torch.inference_mode`. Softmax is taken in float32
and the result returned as float64 (model.evaluation.metrics wants float64).

Test-time augmentation (TTA) averages the softmax probabilities of the first `tta` of the 8
dihedral views (k = 0..tta-1, see model.nets.transforms.dihedral); tta=8 uses the whole group,
so the prediction is invariant to flipping or rotating the patch by 90 degrees.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from model.core.errors import DataError, PcamLensError, one_line
from model.data.batches import iter_batches
from model.evaluation.engine import Engine, build_engine
from model.nets.transforms import as_patch_array, batch_views, prepare

Progress = bool | Callable[[int, int], None]


# --------------------------------------------------------------------------- helpers


def check_tta(tta) -> int:
    """Validate the number of TTA views (1..8)."""
    try:
        k = int(tta)
    except (TypeError, ValueError):
        raise DataError(f"tta must be a whole number of dihedral views from 1 to 8; got "
                        f"{tta!r}.", fix="Use --tta 1 (no TTA), 2, 4 or 8.") from None
    if k != tta or not 1 <= k <= 8:
        raise DataError(f"tta must be a whole number of dihedral views from 1 to 8; got {tta!r}.",
                        fix="Use --tta 1 (no TTA), 2, 4 or 8 (all flips and 90° rotations).")
    return k


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive whole number; got {batch_size!r}.")
    return int(batch_size)


class _Progress:
    """progress=True: a tqdm bar on stderr; a callable(done, total); False: silent."""

    def __init__(self, progress: Progress, total: int, desc: str):
        self.total, self.done, self.bar, self.fn = total, 0, None, None
        if callable(progress):
            self.fn = progress
            self.fn(0, total)
        elif progress:

            self.bar = tqdm(total=total, desc=desc, unit="patch", file=sys.stderr,
                            dynamic_ncols=True, leave=False,
                            disable=None)  # None: no bar when stderr is not a terminal

    def update(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        if self.fn is not None:
            self.fn(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _view_probs_of_batch(engine: Engine, x_uint8: torch.Tensor, loaded, views: int
                         ) -> torch.Tensor:
    """float32 [B, views] P(class 1) of one uint8 [B,H,W,3] batch, one column per TTA view."""
    x = prepare(x_uint8.to(engine.device, non_blocking=True), loaded.input)
    cols = []
    for xv in batch_views(x, views):
        with engine.autocast():
            logits = engine.model(xv)
        cols.append(torch.softmax(logits.float(), dim=1)[:, 1])
    return torch.stack(cols, dim=1)


def _probs_of_batch(engine: Engine, x_uint8: torch.Tensor, loaded, views: int) -> torch.Tensor:
    """float32 [B] P(class 1) of one uint8 [B,H,W,3] batch, averaged over `views` TTA views."""
    p = _view_probs_of_batch(engine, x_uint8, loaded, views)
    return p.mean(dim=1) if views > 1 else p[:, 0]


def _guarded(batches: Iterable) -> Iterator:
    try:
        yield from batches
    except PcamLensError as e:
        clean = one_line(e)
        if clean is e:
            raise
        raise clean from None


def engine_for(loaded, n: int, *, tta: int = 1, backend: str = "eager",
               precision: str = "auto", device=None, compile: bool = False) -> Engine:
    """The engine a job of `n` patches x `tta` views gets (model.evaluation.engine)."""
    return build_engine(loaded, backend="compile" if compile else backend,
                        precision=precision, device=device, passes=n * check_tta(tta))


def _run(loaded, batches: Iterable[tuple[int, torch.Tensor]], n: int, *, tta: int,
         progress: Progress, precision: str, device, desc: str,
         compile: bool = False, per_view: bool = False, backend: str = "eager",
         engine: Engine | None = None) -> np.ndarray:
    """[n] mean probabilities, or [n, tta] one column per view with `per_view`."""
    views = check_tta(tta)
    if engine is None:
        engine = engine_for(loaded, n, tta=views, backend=backend, precision=precision,
                            device=device, compile=compile)
    out = np.empty((n, views) if per_view else n, np.float64)
    bar = _Progress(progress, n, desc)
    step = _view_probs_of_batch if per_view else _probs_of_batch
    try:
        with torch.inference_mode():
            for start, x in _guarded(batches):
                p = step(engine, x, loaded, views)
                out[start:start + len(p)] = p.double().cpu().numpy()
                bar.update(len(p))
    finally:
        bar.close()
    return out


# --------------------------------------------------------------------------- public API


def predict_probs(loaded, source, *, tta: int = 1, batch_size: int = 256,
                  indices=None, progress: Progress = True, precision: str = "auto",
                  device=None, compile: bool = False, per_view: bool = False,
                  backend: str = "eager", engine: Engine | None = None) -> np.ndarray:
    """float64 P(class index 1) for every patch of `source` (or for `indices`), in order.
    With `per_view`: [n, tta], the probability of each dihedral view (their mean is the TTA
    prediction, their spread a measure of uncertainty).

    `loaded`: a model.runs.load.LoadedRun. `tta`: 1..8 dihedral views averaged (softmax probs).
    `indices`: positions in the source (any order, repeats allowed); the result follows them.
    `progress`: True = tqdm bar on stderr, a callable(done, total), or False.
    `precision`: "auto" (bf16 autocast on CUDA / bf16-capable CPUs), "fp32", or "bf16".
    `device`: None = the model's device; another device runs a private copy of the model.
    `compile`: run the model through torch.compile first (see _Compiled: for large sets).
    `backend`: "eager", "compile" (= compile=True) or "onnx" (ONNX Runtime on the CPU, fp32;
    see model.evaluation.onnx_backend); one that cannot run falls back to eager with a note.
    `engine`: an engine built already (`engine_for`; its `choice` says what ran) instead of
    backend/precision/device/compile.
    Memory is bounded by `batch_size`: patches are read batch by batch, never all at once."""

    batch_size = _check_batch_size(batch_size)
    check_tta(tta)
    src = source
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise DataError(f"indices must be a 1-D array of whole numbers; got dtype "
                            f"{idx.dtype}, shape {idx.shape}.")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(source)):
            bad = idx[(idx < 0) | (idx >= len(source))][:5].tolist()
            raise DataError(f"indices {bad} are outside the source's 0..{len(source) - 1}.")
        src = source.subset(idx)
    n = len(src)
    if n == 0:
        return np.empty((0, tta) if per_view else 0, np.float64)
    # A model on the CPU already keeps every core busy: read in this process between batches,
    # not in worker processes (model.data.iter_batches); one batch is not worth them either.
    where = engine.device if engine is not None else (
        torch.device(device) if device is not None else loaded.device)
    batches = iter_batches(src, batch_size,
                           workers=0 if where.type == "cpu" or n <= batch_size else None)
    return _run(loaded, batches, n, tta=tta, progress=progress, precision=precision,
                device=device, compile=compile, per_view=per_view, backend=backend,
                engine=engine, desc=f"predicting {n} patches" + (f" (TTA x{tta})"
                                                                  if tta > 1 else ""))


def predict_batches(loaded, batches: Iterable[tuple[int, torch.Tensor]], n: int, *,
                    tta: int = 1, progress: Progress = True, precision: str = "auto",
                    device=None, compile: bool = False, desc: str = "predicting",
                    backend: str = "eager", engine: Engine | None = None) -> np.ndarray:
    """Like `predict_probs` for batches from elsewhere (e.g. the tiles of a slide):
    (start, uint8 [B,H,W,3]) pairs covering rows 0..n-1; float64 [n]."""
    return _run(loaded, batches, n, tta=tta, progress=progress, precision=precision,
                device=device, compile=compile, desc=desc, backend=backend, engine=engine)


def _array_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for s in range(0, len(x), batch_size):
        yield s, torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size]))


def predict_arrays(loaded, x_uint8: np.ndarray, tta: int = 1, batch_size: int = 256, *,
                   progress: Progress = False, precision: str = "auto",
                   device=None, engine: Engine | None = None) -> np.ndarray:
    """Like `predict_probs` for in-memory uint8 patches [N,H,W,3] (or one [H,W,3])."""
    x = as_patch_array(x_uint8)
    batch_size = _check_batch_size(batch_size)
    if loaded.input.crop > x.shape[1]:
        raise DataError(f"Patches are {x.shape[1]}x{x.shape[2]} but the run crops "
                        f"{loaded.input.crop}x{loaded.input.crop}.",
                        fix=f"Resize the patches to {loaded.input.patch}x{loaded.input.patch}.")
    if len(x) == 0:
        return np.empty(0, np.float64)
    return _run(loaded, _array_batches(x, batch_size), len(x), tta=tta, progress=progress,
                precision=precision, device=device, engine=engine,
                desc=f"predicting {len(x)} patches")


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous shard `rank` of `world` over range(n): sizes differ by at most one, the shards
    are disjoint, and concatenated in rank order they give 0..n-1."""
    for name, v in (("n", n), ("rank", rank), ("world", world)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise DataError(f"{name} must be a whole number; got {v!r}.")
    if n < 0:
        raise DataError(f"n must be >= 0; got {n}.")
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"Shard {rank}/{world} does not exist: need 0 <= RANK < WORLD.",
                        fix="Use --shard 0/2 and --shard 1/2 for two shards.")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return np.arange(start, stop, dtype=np.int64)
