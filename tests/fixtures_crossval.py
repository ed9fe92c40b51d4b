"""The shared cross-validation of the test session: 3 folds over 180 real patches of the shared
sample with an untrained tiny timm network (test_efficientnet, no pretrained weights), head
fitted for 2 epochs on the cached features. Built in a few seconds; its probabilities mean
little, its structure (folds, fold runs, OOF file, ensemble) is what the fast tests check.

    from fixtures_crossval import tiny_cv  # noqa: F401
"""
from __future__ import annotations

from pathlib import Path

import pytest

from model.oof.crossval import CVConfig, run_crossval
from model.oof.heads import HeadFit
from model.training.config import DataConfig, ModelConfig, RuntimeConfig, TrainConfig

_BUILT: dict[str, Path] = {}
TINY_CV_N = 180
TINY_CV_K = 3


def tiny_cv_config(data: Path, run_dir: Path, **kw) -> CVConfig:
    train = TrainConfig(data=DataConfig(spec=str(data), max_items=TINY_CV_N, checks=False),
                        model=ModelConfig(arch="test_efficientnet", pretrained=None),
                        runtime=RuntimeConfig(seed=0, device="cpu"), run_dir=str(run_dir))
    return CVConfig(train=train, folds=TINY_CV_K, head=HeadFit(epochs=2), **kw)


@pytest.fixture(scope="session")
def tiny_cv(tmp_path_factory, kaggle_sample) -> Path:
    """A complete cross-validation directory (shared: do not modify it)."""
    if "cv" not in _BUILT:
        root = tmp_path_factory.mktemp("tiny-cv")
        _BUILT["cv"] = run_crossval(tiny_cv_config(kaggle_sample, root / "cv-tiny"),
                                    log=lambda *_: None)
    return _BUILT["cv"]
