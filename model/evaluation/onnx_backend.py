"""The run's network through ONNX Runtime on the CPU (the backend `auto` picks for large CPU
jobs: model.evaluation.engine).

Measured on the 2-core AMD EPYC of the development machine (AVX2, fp32), lite0 at 96 px,
batch 256, same process: the network alone 555-640 patches/s under ONNX Runtime 1.30 with one
session thread, 700-780 with batch slices in parallel (OnnxModel), against 404-411 in eager
PyTorch (channels_last, the tuned allocator); probabilities within 1e-5 of eager. ONNX Runtime
fuses the depthwise-separable blocks better than eager PyTorch's oneDNN calls.

Graphs (the whole network, or body + pooling for the embedding features) are exported once
per run, checkpoint and input (torch.onnx's dynamo exporter, dynamic batch; ~15 s) to
`<run>/engine/` (or the per-user cache when the run is read-only), written atomically, and
reused. If onnxruntime is missing or the export or the session fails, prediction goes on in
eager PyTorch with a one-line note: never silently a different answer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from model.core.atomic import atomic_path, can_create_files
from model.core.paths import cache_base, path_key
from model.nets.archs import pooled_part

NAME = "onnxruntime"


# what part of the network a graph holds: the whole (logits) or body + pooling (the features
# of the embedding map and the cross-validation heads)
PARTS = {"logits": lambda model: model, "features": pooled_part}


def _key(loaded) -> str:
    blob = json.dumps({"run": str(Path(loaded.run_dir).resolve()),
                       "checkpoint": loaded.checkpoint, "mtime": loaded.checkpoint_mtime,
                       "input": loaded.input.__dict__, "torch": torch.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def model_path(loaded, part: str = "logits") -> Path:
    folder = Path(loaded.run_dir) / "engine"
    if not (folder.is_dir() or can_create_files(loaded.run_dir)):
        folder = cache_base() / "engine" / path_key(loaded.run_dir)
    return folder / f"{'model' if part == 'logits' else part}-{_key(loaded)}.onnx"


def export(loaded, path: Path, part: str = "logits") -> None:
    side = loaded.input.size
    example = torch.zeros(4, 3, side, side)
    with atomic_path(path) as tmp:
        torch.onnx.export(PARTS[part](loaded.model), (example,), str(tmp), input_names=["x"],
                          output_names=[part], dynamic_shapes=({0: torch.export.Dim("n")},),
                          dynamo=True, verbose=False, external_data=False)


MIN_CHUNK = 16  # rows per parallel slice of a batch; smaller batches run as one slice


class OnnxModel:
    """Callable like the network: float [B, 3, H, W] -> logits [B, classes] (torch).

    One single-threaded session run on `threads` slices of each batch at once (ONNX Runtime
    releases the GIL), not one session with `threads` intra-op threads: measured on the 2-core
    development CPU, lite0 at 96 px, 710-780 against 520-640 patches/s, since its depthwise
    convolutions split poorly across threads inside one batch."""

    def __init__(self, loaded, threads: int, part: str = "logits"):
        import onnxruntime as ort  # optional: only this backend needs it

        path = model_path(loaded, part)
        self.exported = not path.exists()
        if self.exported:
            export(loaded, path, part)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path, self.workers = path, max(1, int(threads))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxruntime") \
            if self.workers > 1 else None
        if self.pool is not None:
            weakref.finalize(self, self.pool.shutdown, wait=False)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": arr})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        k = min(self.workers, len(arr) // MIN_CHUNK)
        if self.pool is None or k < 2:
            return torch.from_numpy(self._run(arr))
        parts = [np.ascontiguousarray(p) for p in np.array_split(arr, k)]
        return torch.from_numpy(np.concatenate(list(self.pool.map(self._run, parts))))


def onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def ensure_export(loaded) -> tuple[Path | None, str]:
    """The run's ONNX export, made now if missing (model.train does this after a long
    training, so that the first large prediction starts at full speed): (path, message);
    (None, why) when it cannot be made here."""
    if not onnx_available():
        return None, "onnxruntime is not installed"
    path = model_path(loaded)
    if path.exists():
        return path, f"{path} (exists)"
    t0 = time.perf_counter()
    try:
        export(loaded, path)
    except Exception as e:  # noqa: BLE001  (any exporter failure: inference runs eager)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return path, f"{path} ({time.perf_counter() - t0:.1f} s)"


def onnx_model(loaded, threads: int, part: str = "logits") -> OnnxModel | None:
    """The ONNX Runtime model, or None (with a one-line note) when it cannot be built."""
    try:
        return OnnxModel(loaded, threads, part)
    except Exception as e:  # noqa: BLE001  (any failure: eager PyTorch, and say so)
        print(f"note: ONNX Runtime backend unavailable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''}); predicting with eager "
              "PyTorch.", file=sys.stderr)
        return None
