"""The shared run of the test session, for the inference / evaluation / prediction / Grad-CAM
/ viewer tests. Import the fixtures into a test module:

    from fixtures_runs import tiny_loaded, tiny_run  # noqa: F401

`tiny_run` is a run directory written by the trainer's own steps (prepare the synthetic data,
build resnet18, write config.json and the split, save the weights, predict the validation
split, write metrics.json) with the network's seeded initial weights: no epoch is fitted, so
`pytest -m "not slow"` trains nothing. Its numbers mean nothing; the tests that need learned
weights (the train -> checkpoint -> evaluate round trip, resume, Grad-CAM localisation, the
browser) train their own small runs and are marked slow."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from model.core.atomic import write_csv
from model.evaluation.inference import predict_probs
from model.evaluation.metrics import per_patch_losses
from model.runs.format import save_weights
from model.runs.load import load_run
from model.training.config import (
    DataConfig,
    ModelConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
)
from model.training.learner import build_for_new_run
from model.training.loop import finish, write_new_run_files
from model.training.prepare import prepare_new

# A session fixture imported into several modules is registered once per module, so the run
# is memoised here to be built only once per session.
_BUILT: dict[str, object] = {}

TINY_CONFIG = TrainConfig(
    data=DataConfig(spec="synthetic:n=200", checks=False),
    model=ModelConfig(arch="resnet18", pretrained=None),
    schedule=ScheduleConfig(frozen_epochs=0, epochs=1, lr_find=False),
    runtime=RuntimeConfig(seed=0, device="cpu"))


def _quiet(*_args, **_kwargs) -> None:
    pass


def write_untrained_run(run_dir: Path, config: TrainConfig = TINY_CONFIG) -> Path:
    """A complete run directory whose weights are the seeded initial ones (0 epochs fitted)."""
    p = prepare_new(dataclasses.replace(config, run_dir=str(run_dir)), _quiet)
    torch.manual_seed(p.config.runtime.seed)
    model, _, facts = build_for_new_run(p.config, p.train_src, _quiet)
    p.facts.update(facts)
    write_new_run_files(p, "tests/fixtures_runs.py: write_untrained_run (no epoch fitted)")
    for name in ("best", "last"):
        save_weights(model, p.run_dir / f"{name}.safetensors", {"epoch": None, "auc": None})
    probs = predict_probs(load_run(p.run_dir), p.valid_src, precision="fp32", progress=False)
    write_csv(p.run_dir / "valid_predictions.csv",
              pd.DataFrame({"id": p.valid_src.ids, "label": p.valid_labels, "prob": probs,
                            "loss": per_patch_losses(p.valid_labels, probs)}))
    finish(p, {"epochs_done": 0, "epochs_total": 0, "best_auc": None, "best_epoch": None})
    return p.run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Path of the shared run directory (do not modify it: it is shared)."""
    if "run" not in _BUILT:
        _BUILT["run"] = write_untrained_run(tmp_path_factory.mktemp("tiny-runs") /
                                            "resnet18-tiny")
    return _BUILT["run"]


@pytest.fixture(scope="session")
def tiny_loaded(tiny_run):
    """model.runs.load.load_run(tiny_run), shared read-only like in the viewer."""
    if "loaded" not in _BUILT:
        _BUILT["loaded"] = load_run(tiny_run)
    return _BUILT["loaded"]
