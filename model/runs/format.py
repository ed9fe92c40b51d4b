"""The run directory: a self-describing record of one training run.

    config.json            everything needed to rebuild the model and reproduce the run
    history.csv            one row per completed epoch (phase, losses, accuracy, AUC, lr, time)
    best.safetensors       weights with the best validation AUC
    last.safetensors       weights after the last completed epoch
    resume.safetensors     weights + optimizer state + progress (metadata): the resume point
    valid_ids.csv          the validation split (id, label)
    valid_predictions.csv  id, label, prob, loss of the best weights on the validation split
    metrics.json           validation summary of the best weights
    lr_find.csv            the learning-rate finder curve (lr, loss), when run
    lr_schedule.csv        the learning rate per training iteration
    progress.json          status (running/complete), epochs done, best AUC

Weights are safetensors (no pickle). `load_run` is the one way in for inference and the viewer.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from model.core.atomic import write_bytes
from model.core.errors import RunError

RUN_FORMAT = "pcam-lens-run"
RUN_FORMAT_VERSION = 2  # 2: the resolved TrainConfig under "config"; 1: a "train" section


def library_versions() -> dict:
    import fastai  # heavy (seconds): only when a run is written
    import timm
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "fastai": fastai.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
            "pcam_lens_run_format": RUN_FORMAT_VERSION}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- weights


def save_weights(model: nn.Module, path: Path, metadata: dict | None = None) -> None:
    """Write the model's state dict as safetensors, atomically."""

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes(path, save(state, metadata=meta))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a safetensors file; RunError when missing or corrupted."""

    path = Path(path)
    if not path.exists():
        raise RunError(f"Weights file {path} is missing.", path=path,
                       fix="Resume the run with --resume, or train it again.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RunError(f"Weights file {path} is corrupted ({type(e).__name__}: {e}).", path=path,
                       fix="Use last.safetensors / best.safetensors of another epoch, or retrain."
                       ) from None
    return tensors, meta


# --------------------------------------------------------------------------- config


def read_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"Run directory {run_dir} does not exist.", path=run_dir,
                       fix="Train one with: python -m model.train --run-dir " + str(run_dir))
    path = run_dir / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir} has no config.json: it is not a pcam-lens run.", path=path,
                       fix="Point at a directory written by python -m model.train.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}).", path=path,
                       fix="Restore config.json from a backup or retrain.") from None
    if not isinstance(cfg, dict) or cfg.get("format") != RUN_FORMAT:
        raise RunError(f"{path} is not a pcam-lens run config.", path=path,
                       fix="Point at a directory written by python -m model.train.")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise RunError(f"{path} has run format version {version}; this pcam-lens reads up to "
                       f"{RUN_FORMAT_VERSION}.", path=path,
                       fix="Upgrade pcam-lens (git pull; pip install -r requirements.txt).")
    return cfg


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_progress(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / "progress.json") or {"status": "unknown"}


def list_runs(root: Path) -> list[Path]:
    """Run directories under `root` (those with a config.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.glob("*/config.json")]
    return sorted(runs, key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)


def default_runs_root() -> Path:
    return Path(os.environ.get("PCAM_LENS_RUNS", "runs"))


# --------------------------------------------------------------------------- loading


# --------------------------------------------------------------------------- layout


def data_name(spec) -> str:
    """A short file-name-safe name for a data spec (folder/file name; 'synthetic...')."""
    s = str(spec)
    if s.startswith("synthetic"):
        name = s
    else:
        p = Path(s.rstrip("/\\"))
        name = p.stem if p.suffix.lower() in (".h5", ".hdf5") else p.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")
    return name or "data"


def default_out_dir(run_dir: Path, data) -> Path:
    """Where model.evaluate writes: <run>/eval/valid, or <run>/eval/<data name>."""
    if data is None:
        return Path(run_dir) / "eval" / "valid"
    name = data_name(data)
    return Path(run_dir) / "eval" / (f"data-{name}" if name == "valid" else name)


def default_submission_path(run_dir: Path, data, shard: tuple[int, int] | None = None) -> Path:
    """Where model.predict writes: <run>/predictions/<data name>-submission[.partRofW].csv."""
    name = f"{data_name(data)}-submission"
    if shard is not None:
        name += f".part{shard[0]}of{shard[1]}"
    return Path(run_dir) / "predictions" / f"{name}.csv"
