"""What a run directory says, typed, for the viewer and the command-line tools.

- `summarize_run(run_dir)`: status, headline metrics, best epoch, data provenance (never
  raises: a broken run is a summary with `error` set);
- `same_source(a, b)` / `belongs_to(run_config, source)`: the one definition of "this is the
  data the run was trained on", so that its split and its evaluations apply to it;
- `find_evaluation(run_dir, data, source, checkpoint_mtime)`: model.evaluate's files for this
  source and checkpoint, when they are still valid;
- `training_augmentation(cfg)`: the augmentation the run trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.core.errors import PcamLensError
from model.data.base import PatchSource
from model.nets.transforms import AugmentConfig
from model.runs.format import default_out_dir, read_config, read_json, read_progress
from model.training.config import TrainConfig


@dataclass(frozen=True)
class RunSummary:
    name: str
    dir: Path
    status: str  # running | complete | unknown
    epochs_done: int | None
    epochs_total: int | None
    auc: float | None
    best_epoch: int | None
    arch: str
    data: str  # "synthetic" or the data path
    synthetic: bool
    error: str | None  # why the run cannot be used, when it cannot

    @property
    def epochs_text(self) -> str:
        """"3/5" (epochs done of all), or "" when the run has not said."""
        if self.epochs_total is None:
            return ""
        return f"{self.epochs_done or 0}/{self.epochs_total}"

    @property
    def label(self) -> str:
        """One line for a run selector."""
        if self.error:
            return f"{self.name} · broken"
        auc = f" · AUC {self.auc:.3f}" if isinstance(self.auc, (int, float)) else ""
        status = self.status + (f" {self.epochs_text}" if self.status == "running" else "")
        return f"{self.name} · {status}{auc}" + (" · SYNTHETIC" if self.synthetic else "")


def summarize_run(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    arch, data, synthetic, error = "", "", False, None
    try:
        cfg = read_config(run_dir)
        arch = cfg.get("model", {}).get("arch", "")
        d = cfg.get("data", {})
        synthetic = bool(d.get("synthetic"))
        data = "synthetic" if synthetic else str(d.get("path"))
    except PcamLensError as e:
        error = str(e)
    prog = read_progress(run_dir)
    metrics = read_json(run_dir / "metrics.json") or {}
    auc = metrics.get("auc")
    return RunSummary(name=run_dir.name, dir=run_dir, status=prog.get("status", "unknown"),
                      epochs_done=prog.get("epochs_done"), epochs_total=prog.get("epochs_total"),
                      auc=auc if isinstance(auc, (int, float)) else None,
                      best_epoch=metrics.get("best_epoch", prog.get("best_epoch")), arch=arch,
                      data=data, synthetic=synthetic, error=error)


# --------------------------------------------------------------------------- provenance


def _resolved(path) -> str | None:
    try:
        return str(Path(str(path)).expanduser().resolve())
    except (OSError, TypeError, ValueError):
        return None


def same_source(a: dict, b: dict) -> bool:
    """Do two source descriptions (PatchSource.describe(), config.json's "data") name the same
    patches? Same split; the synthetic set with the same seed (its patches are a function of
    (seed, index), so sets of any size share ids and pixels); otherwise the same data path (a
    packed cache describes itself like the folder it was packed from)."""
    if (a.get("split") or "train") != (b.get("split") or "train"):
        return False
    if a.get("synthetic") or b.get("synthetic"):
        return bool(a.get("synthetic") and b.get("synthetic")
                    and a.get("seed", 0) == b.get("seed", 0))
    pa, pb = _resolved(a.get("path")), _resolved(b.get("path"))
    return pa is not None and pa == pb


def belongs_to(run_config: dict, source: PatchSource) -> bool:
    """True when `source` is the data the run (its config.json) was trained on."""
    return same_source(run_config.get("data") or {}, source.describe())


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Evaluation:
    """The files of one `model.evaluate` run that are valid for a source and checkpoint."""

    out_dir: Path
    metrics: dict
    predictions_csv: Path

    @property
    def tta(self) -> int:
        return int(self.metrics.get("tta", 1))

    @property
    def training_overlap(self) -> int:
        return int(self.metrics.get("n_training_overlap") or 0)


def find_evaluation(run_dir: Path, data, source: PatchSource, checkpoint_mtime: float
                    ) -> Evaluation | None:
    """model.evaluate's output for `data` (the spec it was given) when it was made with this
    checkpoint (same modification time) on these patches (same source, same count)."""
    out_dir = default_out_dir(run_dir, data)
    metrics = read_json(out_dir / "metrics.json")
    if not metrics or metrics.get("checkpoint_mtime") != checkpoint_mtime:
        return None
    theirs = metrics.get("data") or {}
    if theirs.get("n") != len(source) or not same_source(theirs, source.describe()):
        return None
    csv = out_dir / "predictions.csv"
    return Evaluation(out_dir, metrics, csv) if csv.exists() else None


def training_augmentation(cfg: dict) -> AugmentConfig | None:
    """The augmentation the run trained with (None: trained without), from its config.json."""
    choice = TrainConfig.from_run_config(cfg).augment
    return choice.augment_config() if choice.enabled else None
