"""Process-wide runtime settings for CPU speed.

glibc's malloc serves every block above its mmap threshold (at most 32 MB, however it adapts)
with a fresh `mmap` and returns it with `munmap` on free. A training step at 144 px allocates
and frees activation tensors of 20-80 MB each: every step then maps them anew and takes a page
fault for each 4 KB page, so on 2 cores a third of the time went to the kernel (the measured
speed-up is in the README, Performance).
Keeping freed memory in the heap for reuse (the same effect as tcmalloc/jemalloc) costs some
resident memory that a training or inference process holds anyway at its peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

import torch

from model.core.errors import PcamLensError

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# the inference backends (model.evaluation.engine) and where `auto` takes ONNX Runtime: a CPU
# fp32 job of at least AUTO_ONNX_MIN forward passes (about where its one-off export pays)
BACKENDS = ("auto", "eager", "compile", "onnx")
AUTO_ONNX_MIN = 20_000
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GB come from (and go back to) the heap
TRIM_THRESHOLD = 2 << 30  # give memory back to the system only above 2 GB of free heap top
_done: bool | None = None


def tune_allocator() -> bool:
    """Make glibc keep large freed blocks for reuse. Idempotent; True when applied (Linux with
    glibc), False elsewhere or when PCAM_LENS_NO_MALLOPT is set. Affects this process and the
    worker processes it forks afterwards."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("PCAM_LENS_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def quiet_known_warnings() -> None:
    """Silence third-party warnings a user can do nothing about: fastai's layers.py calls
    `torch.jit.script` at import, which torch >= 2.10 reports as deprecated on every run.
    Also for the processes this one starts (spawned workers, subprocesses), through
    PYTHONWARNINGS, whose message field matches the start of the warning text."""

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    rule = "ignore:`torch.jit.script` is deprecated:FutureWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if rule not in current.split(","):
        os.environ["PYTHONWARNINGS"] = f"{current},{rule}" if current else rule


def process_memory_mb(pid: int | str = "self") -> dict:
    """Resident memory of a process now (`rss_mb`) and at its peak (`peak_rss_mb`), from
    /proc/<pid>/status (VmRSS, VmHWM); {} where there is no /proc. Unlike getrusage's
    ru_maxrss, VmHWM starts afresh in a spawned process instead of inheriting the peak of the
    process that forked it."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- device and precision


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PcamLensError("--device cuda was asked for but no CUDA GPU is visible.",
                            fix="Use --device cpu, or check the GPU driver / CUDA build of torch.")
    return name


def resolve_precision(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPU training stays fp32: bf16 autocast made tf_efficientnet_lite0 training several times
    # slower on an AVX-512-BF16 CPU (the depthwise-conv backward has no fast bf16 kernel;
    # README, Performance). Inference does gain from bf16.
    return "fp32"


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls/convs are native, so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags
