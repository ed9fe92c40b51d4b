"""A tiny trained run, built once per test session, for the inference / evaluation /
prediction / Grad-CAM tests. Import the fixtures into a test module:

    from fixtures_runs import tiny_loaded, tiny_run  # noqa: F401

resnet18 from scratch, one unfrozen epoch on 200 synthetic patches (about a minute on two busy
CPU cores). The numbers it gives mean nothing; it only has to be a real run directory."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A session fixture imported into several modules is registered once per module, so the run
# is memoised here to be built only once per session.
_BUILT: dict[str, Path] = {}

TINY_RUN_ARGS = ["--no-pretrained", "--arch", "resnet18", "--frozen-epochs", "0",
                 "--epochs", "1", "--data", "synthetic:n=200", "--no-checks", "--no-lr-find",
                 "--seed", "0"]


def build_tiny_run(run_dir: Path) -> Path:
    from model.train import main

    rc = main([*TINY_RUN_ARGS, "--run-dir", str(run_dir)])
    assert rc == 0, f"building the tiny run failed (exit {rc})"
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Path of a tiny trained run directory (do not modify it: it is shared)."""
    if "run" not in _BUILT:
        _BUILT["run"] = build_tiny_run(tmp_path_factory.mktemp("tiny-runs") / "resnet18-tiny")
    return _BUILT["run"]


@pytest.fixture(scope="session")
def tiny_loaded(tiny_run):
    """model.runs.format.load_run(tiny_run), shared read-only like in the viewer."""
    from model.runs.load import load_run

    if "loaded" not in _BUILT:
        _BUILT["loaded"] = load_run(tiny_run)
    return _BUILT["loaded"]
