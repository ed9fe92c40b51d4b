"""The K fold models of a cross-validation as one ensemble: the mean of their probabilities.

    ens = load_ensemble("runs/cv-...")       # every fold run's model (best checkpoint)
    probs, members = predict_ensemble(ens, source, tta=8)   # [n], [n, K]
    pred = predict_run(ens_or_run, source, tta=8)   # either kind, + which engine ran

model.evaluate and model.predict accept a cross-validation directory where they accept a run
directory and then predict with the ensemble; the spread of the members (`fold_std`) is the
disagreement of the fold models, a measure of uncertainty beside the TTA spread.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.errors import RunError
from model.evaluation.inference import engine_for, predict_probs
from model.nets.transforms import InputConfig
from model.runs.crossval import open_crossval
from model.runs.load import LoadedRun, load_run


@dataclass
class Ensemble:
    """Fold models that share one input transform; reads like a LoadedRun where evaluation
    needs one (name, config, input, checkpoint, checkpoint_mtime, synthetic)."""

    run_dir: Path
    members: list[LoadedRun]
    config: dict  # the first member's config.json (data, model, input are shared)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def input(self) -> InputConfig:
        return self.members[0].input

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    @property
    def checkpoint(self) -> str:
        return f"ensemble of {len(self.members)} fold models ({self.members[0].checkpoint})"

    @property
    def checkpoint_mtime(self) -> float:
        return max(m.checkpoint_mtime for m in self.members)

    @property
    def synthetic(self) -> bool:
        return self.members[0].synthetic

    def train_ids(self) -> set[str]:
        """Ids any member trained on (what evaluation must not count as unseen)."""
        ids: set[str] = set()
        for m in self.members:
            path = m.run_dir / "train_ids.csv"
            if path.exists():
                ids |= set(pd.read_csv(path, dtype={"id": str})["id"])
        return ids


def load_ensemble(cv_dir, checkpoint: str = "best", *, device: str = "cpu") -> Ensemble:
    """Every fold run of a complete cross-validation, loaded; RunError when one is missing or
    the folds do not share their input transform."""
    cv = open_crossval(cv_dir)
    members = [load_run(d, checkpoint, device=device, lazy=True) for d in cv.fold_dirs]
    first = members[0].input.to_dict()
    for m in members[1:]:
        if m.input.to_dict() != first or m.classes != members[0].classes:
            raise RunError(f"Fold run {m.run_dir} has another input transform or classes than "
                           f"{members[0].run_dir}: they are not one ensemble.", path=m.run_dir,
                           fix="Run the cross-validation again (--run-dir to a new folder).")
    return Ensemble(cv.dir, members, members[0].config)


@dataclass
class Predictions:
    probs: np.ndarray  # [n] (the members' mean for an ensemble)
    members: np.ndarray | None  # [n, K] for an ensemble
    engine: dict  # what ran and why (model.evaluation.engine.EngineChoice), for the outputs


def _engine_record(choices: list[dict]) -> dict:
    """One choice when every member ran the same way (the usual case), else all of them."""
    same = all({k: v for k, v in c.items() if k != "artifact"}
               == {k: v for k, v in choices[0].items() if k != "artifact"} for c in choices)
    return dict(choices[0], members=len(choices)) if same and len(choices) > 1 else (
        choices[0] if same else {"members": choices})


def predict_run(loaded, source, *, tta: int = 1, indices=None, progress=True,
                batch_size: int = 256, precision: str = "auto", compile: bool = False,
                backend: str = "eager") -> Predictions:
    """P(class 1) of a run or of an ensemble (each fold model, then their mean), through one
    engine per model (model.evaluation.engine), with the record of what ran."""
    models = loaded.members if isinstance(loaded, Ensemble) else [loaded]
    n = len(source) if indices is None else len(indices)
    cols, choices = [], []
    for k, m in enumerate(models):
        def prog(done, total, k=k):
            if callable(progress):
                progress(k * total + done, len(models) * total)
        engine = engine_for(m, n, tta=tta, backend=backend, precision=precision,
                            compile=compile)
        choices.append(engine.choice.to_dict())
        cols.append(predict_probs(m, source, tta=tta, indices=indices, batch_size=batch_size,
                                  progress=prog if callable(progress) else progress,
                                  engine=engine))
    if not isinstance(loaded, Ensemble):
        return Predictions(cols[0], None, choices[0])
    members = np.stack(cols, axis=1)
    return Predictions(members.mean(axis=1), members, _engine_record(choices))


def predict_ensemble(ens: Ensemble, source, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(mean probability [n], member probabilities [n, K]) over the patches of `source`
    (keywords: those of `predict_run`)."""
    pred = predict_run(ens, source, **kw)
    return pred.probs, pred.members
