"""Rebuild a trained model from its run directory: config.json + safetensors, no pickle.

    loaded = load_run("runs/<name>")            # best.safetensors, eval mode, CPU
    loaded.model, loaded.input, loaded.classes

`load_run` is the one way in for inference, evaluation and the viewer.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.core.errors import RunError
from model.nets.archs import HeadConfig, build_model, module_device
from model.nets.transforms import InputConfig
from model.runs.format import read_config, read_safetensors


class LoadedRun:
    """A trained model ready for inference, with what is needed to feed it.

    The network is built on first use of `.model` (`build`): an inference backend that runs
    an exported graph (model.evaluation.onnx_backend) never needs it, and building it costs
    ~4 s of start-up (fastai, torchvision and timm imports, the weights) in every command."""

    def __init__(self, run_dir: Path, config: dict, input: InputConfig, classes: list[str],
                 checkpoint: str, checkpoint_mtime: float, *, model: nn.Module | None = None,
                 build: Callable[[], nn.Module] | None = None,
                 device: torch.device | str = "cpu"):
        if model is None and build is None:
            raise ValueError("LoadedRun needs a model or a way to build it")
        self.run_dir, self.config, self.input, self.classes = run_dir, config, input, classes
        self.checkpoint, self.checkpoint_mtime = checkpoint, checkpoint_mtime
        self._model, self._build, self._device = model, build, torch.device(device)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self._build()
        return self._model

    @property
    def model_built(self) -> bool:
        return self._model is not None

    @property
    def device(self) -> torch.device:
        """Where the model is (or will be built), without building it."""
        return module_device(self._model) if self._model is not None else self._device

    def __repr__(self) -> str:
        return f"LoadedRun({self.run_dir}, {self.checkpoint})"

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
    m = cfg["model"]
    model, _ = build_model(m["arch"], len(m["classes"]), state=None,
                           head=HeadConfig(**m.get("head", {})))
    return model


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", *,
             device: str | torch.device = "cpu", lazy: bool = False) -> LoadedRun:
    """Rebuild the model of a run from config.json + safetensors, in eval mode.

    Nothing is unpickled. Raises RunError for a missing/incompatible/corrupted run.
    `lazy`: build the network on first use of `.model` (inference that may run an exported
    graph instead: model.predict, model.evaluate, model.slide)."""

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    path = weights_path(run_dir, checkpoint)
    if not path.is_file():
        read_safetensors(path)  # its error: which file, and what to do
    if "model" not in cfg or "input" not in cfg:
        raise RunError(f"{run_dir / 'config.json'} does not describe a model and its input.",
                       path=run_dir / "config.json",
                       fix="The run directory is inconsistent; retrain or restore it.")
    loaded = LoadedRun(run_dir=run_dir, config=cfg, input=InputConfig.from_dict(cfg["input"]),
                       classes=list(cfg["model"]["classes"]), checkpoint=path.stem,
                       checkpoint_mtime=path.stat().st_mtime,
                       build=lambda: _build(cfg, path, device), device=device)
    if not lazy:
        loaded.model  # noqa: B018  (build now: a broken run fails here, not later)
    return loaded


def _build(cfg: dict, path: Path, device) -> nn.Module:
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
    return model


def load_export_pkl(path: str | os.PathLike, *, allow_pickle: bool = False):
    """Load fastai's export.pkl. Pickle runs code from the file, so this needs an explicit
    opt-in; prefer `load_run`, which reads only safetensors and JSON."""
    if not allow_pickle:
        raise RunError(f"Refusing to unpickle {path}: a pickle can run arbitrary code.",
                       path=path, fix="Use load_run(run_dir) (safetensors), or pass "
                                      "allow_pickle=True if you trust the file.")

    from fastai.learner import load_learner

    warnings.warn(f"Unpickling {path}: this runs code stored in the file.", stacklevel=2)
    return load_learner(path)
