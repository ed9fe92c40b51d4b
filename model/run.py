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
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.errors import RunError

RUN_FORMAT = "pcam-lens-run"
RUN_FORMAT_VERSION = 1


def library_versions() -> dict:
    import fastai
    import numpy
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
    from safetensors.torch import save

    from model.atomic import write_bytes

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes(path, save(state, metadata=meta))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a safetensors file; RunError when missing or corrupted."""
    from safetensors import safe_open

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


def read_progress(run_dir: Path) -> dict:
    p = Path(run_dir) / "progress.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "unknown"}


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


@dataclass
class LoadedRun:
    """A trained model ready for inference, with what is needed to feed it."""

    run_dir: Path
    config: dict
    model: nn.Module
    input: InputConfig  # noqa: F821
    classes: list[str]
    checkpoint: str
    checkpoint_mtime: float

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def synthetic(self) -> bool:
        return bool(self.config.get("data", {}).get("synthetic"))


def weights_path(run_dir: Path, checkpoint: str = "best") -> Path:
    run_dir = Path(run_dir)
    p = run_dir / f"{checkpoint}.safetensors"
    if checkpoint == "best" and not p.exists() and (run_dir / "last.safetensors").exists():
        return run_dir / "last.safetensors"
    return p


def model_from_config(cfg: dict) -> nn.Module:
    from model.archs import HeadConfig, build_model

    m = cfg["model"]
    model, _ = build_model(m["arch"], len(m["classes"]), state=None,
                           head=HeadConfig(**m.get("head", {})))
    return model


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", *,
             device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model of a run from config.json + safetensors, in eval mode.

    Nothing is unpickled. Raises RunError for a missing/incompatible/corrupted run."""
    from model.presets import InputConfig

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    path = weights_path(run_dir, checkpoint)
    state, _ = read_safetensors(path)
    try:
        model = model_from_config(cfg)
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise RunError(f"Weights {path} do not fit the model described by config.json "
                       f"({str(e).splitlines()[0]}).", path=path,
                       fix="The run directory is inconsistent; retrain or restore it.") from None
    model.eval().to(device).to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedRun(run_dir=run_dir, config=cfg, model=model,
                     input=InputConfig.from_dict(cfg["input"]),
                     classes=list(cfg["model"]["classes"]), checkpoint=path.stem,
                     checkpoint_mtime=path.stat().st_mtime)


def load_export_pkl(path: str | os.PathLike, *, allow_pickle: bool = False):
    """Load fastai's export.pkl. Pickle runs code from the file, so this needs an explicit
    opt-in; prefer `load_run`, which reads only safetensors and JSON."""
    if not allow_pickle:
        raise RunError(f"Refusing to unpickle {path}: a pickle can run arbitrary code.",
                       path=path, fix="Use load_run(run_dir) (safetensors), or pass "
                                      "allow_pickle=True if you trust the file.")
    import warnings

    from fastai.learner import load_learner

    warnings.warn(f"Unpickling {path}: this runs code stored in the file.", stacklevel=2)
    return load_learner(path)
