"""The inference engine: which backend runs the run's network, on which device and in which
precision, and why; every batched inference (model.evaluation.inference: predict, evaluate,
slides, out-of-fold predictions, the viewer) goes through `build_engine`.

    engine = build_engine(loaded, backend="auto", passes=24_000)
    engine.model(x)            # float [B, 3, H, W] -> logits, under engine.amp autocast
    engine.choice.to_dict()    # {"backend": "onnxruntime", "why": "...", ...} for the output

Backends: eager PyTorch (channels_last; bf16 autocast on CUDA and on CPUs with native bf16),
torch.compile (inductor, weights frozen), and ONNX Runtime on the CPU in fp32
(model.evaluation.onnx_backend). `auto` picks ONNX Runtime for a CPU fp32 job of at least
AUTO_ONNX_MIN forward passes, or whenever the run's export already exists (its ~10 s one-off
cost is paid), and eager otherwise. Measured on the 2-core development CPU (README,
Performance): the network alone 841 patches/s under ONNX Runtime against 516 eager. Kept out
after measuring there: OpenVINO (fp32 on a par with ONNX Runtime) and int8 static
quantisation (ONNX Runtime QDQ and OpenVINO/NNCF, calibrated on training patches: 1.7x the
speed, but the real-sample AUC fell by 0.008-0.07 on a CPU without VNNI, over the 0.002
allowed).

A backend that cannot be built here falls back to eager with a one-line note on stderr, and
the choice records it: an output never claims a backend that did not run.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

from model.core.errors import PcamLensError
from model.core.runtime import AUTO_ONNX_MIN, BACKENDS, cpu_has_bf16
from model.evaluation import onnx_backend
from model.nets.archs import module_device, pooled_part

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class EngineChoice:
    """What ran and why: written into every output that holds predictions."""

    backend: str  # "eager", "compile" or "onnxruntime"
    requested: str  # what was asked for: auto, eager, compile, onnx
    why: str
    device: str
    precision: str  # "fp32" or "bf16" (autocast)
    threads: int
    versions: dict = field(default_factory=dict)
    artifact: str | None = None  # the ONNX file, for onnxruntime

    def to_dict(self) -> dict:
        return asdict(self)



def describe_engine(record: dict) -> str:
    """'onnxruntime fp32 on cpu (auto: ...)' from an engine record (EngineChoice.to_dict, or
    model.evaluation.ensemble's record of several fold models)."""
    if "backend" not in record:
        return "; ".join(describe_engine(m) for m in record.get("members", []))
    k = record.get("members")
    return (f"{record['backend']} {record['precision']} on {record['device']} "
            f"({record['why']})" + (f", each of {k} fold models" if k else ""))


@dataclass
class Engine:
    model: object  # callable: float [B,3,H,W] -> logits [B, classes]
    amp: torch.dtype | None
    device: torch.device
    choice: EngineChoice

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


def resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    auto: bf16 on CUDA and on CPUs with native bf16 (model.core.runtime.cpu_has_bf16), else
    fp32."""
    if precision not in PRECISIONS:
        raise PcamLensError(f"Unknown precision {precision!r}.",
                            fix=f"Use one of: {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else None


def model_on(loaded, device) -> tuple[torch.nn.Module, torch.device]:
    """The run's model on `device` (None = where it already is). A model living elsewhere is
    copied, never moved: the loaded model may be shared (viewer sessions)."""
    model = loaded.model
    here = loaded.device
    if device is None:
        return model, here
    device = torch.device(device)
    if device.type == here.type and (device.index is None or device.index == here.index):
        return model, here
    return copy.deepcopy(model).to(device), device


def _set_threads(device: torch.device) -> None:
    n = os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class _Compiled:
    """The model through `torch.compile` (inductor, weights frozen into the graph: BN folded
    into the convolutions, oneDNN weight packing). One static graph serves every batch: a
    short last batch is padded to the first batch's size, since a second shape would mean a
    second compilation. Compiling takes tens of seconds and then speeds up the forward pass
    (README, Performance), so it pays on large sets only. If compiling fails (no C++
    compiler, an unsupported op), prediction goes on without it and says so."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.fn, self.rows = model, torch.compile(model, dynamic=False), None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            return self.model(x)
        n = len(x)
        self.rows = self.rows or n
        if n < self.rows:
            x = torch.cat([x, x.new_zeros((self.rows - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        try:
            import torch._inductor.config as inductor_config  # only this backend needs it

            with inductor_config.patch(freezing=True):
                return self.fn(x)[:n]
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say so)
            print(f"note: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                  "predicting without it.", file=sys.stderr)
            self.fn = None
            return self.model(x[:n])


def eager_engine(module: torch.nn.Module, precision: str = "auto") -> Engine:
    """An eager engine around a plain module (e.g. a network still in training: the
    cross-validation's features), where it lives."""
    device = module_device(module)
    amp = resolve_amp(precision, device)
    return Engine(module, amp, device, EngineChoice(
        backend="eager", requested="eager", why="a module in memory", device=str(device),
        precision="bf16" if amp is not None else "fp32",
        threads=torch.get_num_threads() if device.type == "cpu" else 0,
        versions=_versions("eager")))


def _auto(loaded, device: torch.device, amp, passes: int, part: str) -> tuple[str, str]:
    """(backend, why) for backend='auto'."""
    if device.type != "cpu":
        return "eager", f"auto: {device.type} runs eager PyTorch"
    if amp is not None:
        return "eager", "auto: bf16 autocast on this CPU runs in eager PyTorch"
    if not onnx_backend.onnx_available():
        return "eager", "auto: onnxruntime is not installed"
    if onnx_backend.model_path(loaded, part).exists():
        return "onnx", "auto: the run's ONNX export exists"
    if passes >= AUTO_ONNX_MIN:
        return "onnx", f"auto: {passes:,} forward passes >= {AUTO_ONNX_MIN:,} pay for the export"
    return "eager", f"auto: {passes:,} forward passes < {AUTO_ONNX_MIN:,}, not worth an export"


def _versions(backend: str) -> dict:
    v = {"torch": torch.__version__}
    if backend == "onnxruntime":
        import onnxruntime  # present: the session was built

        v["onnxruntime"] = onnxruntime.__version__
    return v


def build_engine(loaded, *, backend: str = "eager", precision: str = "auto", device=None,
                 passes: int = 0, part: str = "logits") -> Engine:
    """The engine for `loaded` (a model.runs.load.LoadedRun). `passes`: forward passes the job
    will make (patches x TTA views), for backend='auto'. `part`: "logits" (the network) or
    "features" (body + pooling: model.nets.archs.pooled_part, for embeddings)."""
    if part not in onnx_backend.PARTS:
        raise PcamLensError(f"Unknown network part {part!r}.", fix="Use logits or features.")
    if backend not in BACKENDS:
        raise PcamLensError(f"Unknown inference backend {backend!r}.",
                            fix=f"Use one of: {', '.join(BACKENDS)}.")
    device = torch.device(device) if device is not None else loaded.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PcamLensError("device cuda was asked for but no CUDA GPU is visible.",
                            fix="Use the CPU (device=None / 'cpu').")
    amp = resolve_amp(precision, device)
    _set_threads(device)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    want, why = (backend, f"asked for {backend}") if backend != "auto" else \
        _auto(loaded, device, amp, passes, part)

    def choice(name, why_, amp_=amp, artifact=None):
        return EngineChoice(backend=name, requested=backend, why=why_, device=str(device),
                            precision="bf16" if amp_ is not None else "fp32", threads=threads,
                            versions=_versions(name), artifact=artifact)

    if want == "onnx":
        if device.type != "cpu" or amp is not None:
            print(f"note: the ONNX Runtime backend runs fp32 on the CPU; predicting with "
                  f"eager PyTorch on {device.type}"
                  + (" in bf16" if amp is not None else "") + ".", file=sys.stderr)
            why += "; ONNX Runtime runs fp32 on the CPU only"
        else:
            # the exported graph: the PyTorch network is only built if it must be exported
            ort = onnx_backend.onnx_model(loaded, threads, part=part)
            if ort is not None:
                return Engine(ort, None, device, choice("onnxruntime", why, None,
                                                        str(ort.path)))
            why += "; ONNX Runtime could not be built here"
    model, device = model_on(loaded, device)
    if part == "features":
        model = pooled_part(model)
    if want == "compile":
        return Engine(_Compiled(model), amp, device, choice("compile", why))
    return Engine(model, amp, device, choice("eager", why))
