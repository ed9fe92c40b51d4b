"""K-fold cross-validation: an out-of-fold probability for every labelled patch.

    from model.oof.crossval import CVConfig, run_crossval, resume_crossval
    config = CVConfig(train=TrainConfig(data=DataConfig(spec="../shared/data/pcam-sample")))
    cv_dir = run_crossval(config)
    resume_crossval(cv_dir)   # after a kill: finished folds are kept, the rest is redone

The steps: prepare the data once (open, subsample, check, relabel from the review log:
model.training.prepare), assign every patch to one held-out fold (stratified, or grouped by
slide when the data has slide ids: model.data.splits.fold_assignment), compute the pooled
body features of every patch under the 8 dihedral views once (model.evaluation.features),
then for each fold fit the network's head on the other folds' features (model.oof.heads),
optionally fine-tune the whole network for a few epochs with the ordinary trainer
(`finetune_epochs`), and write the fold as an ordinary run directory. The held-out fold's 8
view probabilities give its out-of-fold prediction (their mean) and its TTA spread; cleanlab
ranks the labels (model.evaluation.label_issues). The directory layout is model.runs.crossval.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model.core.atomic import write_csv, write_json
from model.core.errors import RunError
from model.data.base import ids_fingerprint
from model.data.splits import Split, fold_assignment
from model.evaluation.features import cached_features, head_after_pool
from model.evaluation.inference import engine_for, predict_probs
from model.evaluation.label_issues import label_issues
from model.evaluation.metrics import per_patch_losses, roc_auc, summary
from model.nets.transforms import InputConfig
from model.oof.heads import HeadFit, fit_head, view_probs
from model.runs.crossval import CV_FORMAT, CV_FORMAT_VERSION, OOF_FILE, fold_dir, read_cv
from model.runs.format import (
    default_runs_root,
    git_commit,
    library_versions,
    read_json,
    save_weights,
)
from model.runs.load import load_run
from model.training.config import ConfigError, ScheduleConfig, SplitConfig, TrainConfig
from model.training.learner import build_for_new_run
from model.training.loop import finish, resume, train_prepared, write_new_run_files
from model.training.prepare import PreparedData, prepare_data, prepare_split

CV_INPUT = 96  # crop and network input side unless given: the patch as it is (see README)


@dataclass
class CVConfig:
    """What a cross-validation does. `train` supplies the data, model, input, fine-tuning
    schedule and runtime sections (its split section's method: auto/stratified/grouped)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = 5
    head: HeadFit = field(default_factory=HeadFit)
    finetune_epochs: int = 0  # unfrozen epochs of the ordinary trainer after the head
    views: int = 8  # dihedral TTA views of the out-of-fold predictions
    # confident learning's "prune, then retrain": rounds of head fitting whose flagged label
    # issues are left out of the next round's training (never out of its predictions)
    prune_rounds: int = 0
    features_dir: str | None = None  # the feature cache (None: <cv dir>/features); caches
    # are keyed by weights, input and ids, so cross-validations of one data set can share one

    def __post_init__(self) -> None:
        def bad(what, fix):
            raise ConfigError(what, fix=fix)

        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 2:
            bad(f"Cross-validation needs at least 2 folds; got --folds {self.folds!r}.",
                "Use --folds 5 (the default) or another whole number >= 2.")
        if not isinstance(self.finetune_epochs, int) or not 0 <= self.finetune_epochs <= 100:
            bad(f"--finetune-epochs must be a whole number 0..100; got {self.finetune_epochs!r}.",
                "Use 0 (head only, the default) or 1.")
        if not isinstance(self.prune_rounds, int) or not 0 <= self.prune_rounds <= 5:
            bad(f"--prune-rounds must be 0..5; got {self.prune_rounds!r}.", "Use 0 or 1.")
        if not isinstance(self.views, int) or not 1 <= self.views <= 8:
            bad(f"--views must be 1..8; got {self.views!r}.", "Use 8 (every dihedral view).")
        h = self.head
        if not (isinstance(h.epochs, int) and h.epochs >= 1 and h.lr > 0 and h.bs >= 1
                and h.wd >= 0):
            bad(f"Head fitting needs epochs >= 1, lr > 0, bs >= 1, wd >= 0; got {h}.",
                "Use the defaults (--head-epochs 8).")

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "folds": self.folds, "head": asdict(self.head),
                "finetune_epochs": self.finetune_epochs, "views": self.views,
                "features_dir": self.features_dir, "prune_rounds": self.prune_rounds}

    @classmethod
    def from_dict(cls, d: dict) -> CVConfig:
        return cls(train=TrainConfig.from_dict(d["train"]), folds=d["folds"],
                   head=HeadFit(**d["head"]), finetune_epochs=d["finetune_epochs"],
                   views=d["views"], features_dir=d.get("features_dir"),
                   prune_rounds=d.get("prune_rounds", 0))


# --------------------------------------------------------------------------- configuration


def _with_cv_input(train: TrainConfig) -> TrainConfig:
    """The network sees the whole 96 px patch at 96 px unless told otherwise: the features of
    every patch and view are computed once, and 96 px costs 2.5x less than 144 px."""
    inp = train.input
    return dataclasses.replace(train, input=dataclasses.replace(
        inp, crop=inp.crop or CV_INPUT, size=inp.size or inp.crop or CV_INPUT))


def fold_config(cfg: CVConfig, cv_dir: Path, k: int, init: Path | None = None) -> TrainConfig:
    """Fold k's own TrainConfig (as its config.json records it): its held-out ids as the
    validation list, and the schedule it was trained with."""
    t = cfg.train
    if cfg.finetune_epochs:
        sched = ScheduleConfig(preset=t.schedule.preset, frozen_epochs=0,
                               epochs=cfg.finetune_epochs, lr=t.schedule.lr, lr_find=False)
    else:
        sched = ScheduleConfig(preset=t.schedule.preset, frozen_epochs=cfg.head.epochs,
                               epochs=0, lr=cfg.head.lr, lr_find=False)
    return dataclasses.replace(
        t, split=SplitConfig(method=t.split.method, valid_pct=t.split.valid_pct,
                             valid_ids=str(cv_dir / "folds" / f"fold-{k}.csv")),
        model=dataclasses.replace(t.model, init_weights=None if init is None else str(init)),
        schedule=sched, run_dir=str(fold_dir(cv_dir, k)))


def default_cv_dir(train: TrainConfig, source) -> Path:
    name = "synthetic" if source.synthetic else Path(str(source.root)).name
    return default_runs_root() / f"cv-{time.strftime('%Y%m%d-%H%M%S')}-{train.model.arch}-{name}"


# --------------------------------------------------------------------------- the steps


def run_crossval(cfg: CVConfig, log=print, *, command: str | None = None) -> Path:
    """Run a new cross-validation; return its directory."""
    cfg = dataclasses.replace(cfg, train=_with_cv_input(cfg.train))
    data = prepare_data(cfg.train, log)
    cfg = dataclasses.replace(cfg, train=data.config)  # resolved for this data
    folds = _assign(cfg, data)
    cv_dir = Path(cfg.train.run_dir) if cfg.train.run_dir else default_cv_dir(cfg.train,
                                                                              data.source)
    if (cv_dir / "cv.json").exists():
        raise RunError(f"{cv_dir} already holds a cross-validation.", path=cv_dir,
                       fix=f"Resume it (python -m model.crossval --resume {cv_dir}) or choose "
                           "another --run-dir.")
    _write_start(cv_dir, cfg, data, folds, command)
    log(f"Cross-validation: {cfg.folds} folds over {len(folds):,} labelled patches "
        f"({_fold_method(data)}); directory {cv_dir}")
    return _run_folds(cv_dir, cfg, data, folds, log, command)


def resume_crossval(cv_dir, log=print) -> Path:
    """Continue a cross-validation: completed folds of this configuration are kept, the
    others are (re)done; the data must be the one it started on."""
    cv_dir = Path(cv_dir)
    cvj = read_cv(cv_dir)
    cfg = CVConfig.from_dict(cvj["config"])
    data = prepare_data(cfg.train, log)
    if ids_fingerprint(data.source.ids) != cvj["ids_fingerprint"]:
        raise RunError(f"The data of {cv_dir} has changed since the cross-validation started "
                       f"({len(data.source):,} patches now, {cvj['n']:,} then, or other ids).",
                       path=cv_dir, fix="Restore the data, or start a new cross-validation.")
    folds = _assign(cfg, data)
    _check_folds_file(cv_dir, data, folds)
    log(f"Resuming the cross-validation in {cv_dir}")
    return _run_folds(cv_dir, cfg, data, folds, log, cvj.get("command"))


def _fold_method(data: PreparedData) -> str:
    return "grouped by slide" if data.source.groups is not None else "stratified"


def _assign(cfg: CVConfig, data: PreparedData) -> np.ndarray:
    src = data.source
    method = cfg.train.split.method
    groups = src.groups if method in ("auto", "grouped") else None
    if method == "grouped" and groups is None:
        raise ConfigError("--split grouped needs slide ids (a PCam *_meta.csv beside "
                                 "the .h5).", fix="Use --split auto or stratified.")
    return fold_assignment(np.asarray(src.labels), cfg.folds, cfg.train.runtime.seed, groups)


def _write_start(cv_dir: Path, cfg: CVConfig, data: PreparedData, folds: np.ndarray,
                 command: str | None) -> None:
    """folds.csv, one id list per fold, then cv.json (status running)."""
    src = data.source
    (cv_dir / "folds").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"id": list(src.ids), "label": np.asarray(src.labels, np.int64),
                          "fold": folds})
    if src.groups is not None:
        table["group"] = src.groups
    write_csv(cv_dir / "folds.csv", table)
    for k in range(cfg.folds):
        write_csv(cv_dir / "folds" / f"fold-{k}.csv", table.loc[folds == k, ["id", "label"]])
    write_json(cv_dir / "cv.json", {
        "format": CV_FORMAT, "format_version": CV_FORMAT_VERSION, "status": "running",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
        "data": data.data_facts, "n": len(src), "ids_fingerprint": ids_fingerprint(src.ids),
        "fold_method": _fold_method(data), "versions": library_versions(),
        "git_commit": git_commit(),
        "command": command or f"(library call from {Path(sys.argv[0]).name})"})


def _check_folds_file(cv_dir: Path, data: PreparedData, folds: np.ndarray) -> None:
    try:
        old = pd.read_csv(cv_dir / "folds.csv", dtype={"id": str})
        same = (list(old["id"]) == list(data.source.ids)
                and np.array_equal(old["fold"].to_numpy(), folds))
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        same = False
    if not same:
        raise RunError(f"{cv_dir}/folds.csv does not match the folds of this configuration "
                       "and data.", path=cv_dir / "folds.csv",
                       fix="Start a new cross-validation (another --run-dir).")


def _run_folds(cv_dir: Path, cfg: CVConfig, data: PreparedData, folds: np.ndarray, log,
               command: str | None) -> Path:
    t0 = time.time()
    src = data.source
    body_cfg = fold_config(cfg, cv_dir, 0)
    torch.manual_seed(cfg.train.runtime.seed)
    model, _, facts = build_for_new_run(body_cfg, src, log)
    input_cfg = InputConfig.from_dict(facts["input"])
    cache = Path(cfg.features_dir) if cfg.features_dir else cv_dir / "features"
    feats = cached_features(model, input_cfg, src, cache, views=cfg.views, log=log)
    seconds = {"features": round(time.time() - t0, 1), "folds": []}
    log(f"Features of {len(src):,} patches x {cfg.views} views: {seconds['features']:.0f} s")
    pruned = np.zeros(len(src), bool)
    for r in range(cfg.prune_rounds):
        t1 = time.time()
        pruned = _prune_round(cfg, data, folds, feats, model[0], pruned, r, log)
        seconds.setdefault("prune_rounds", []).append(round(time.time() - t1, 1))
    parts = []
    for k in range(cfg.folds):
        t1 = time.time()
        parts.append(_fold(cv_dir, cfg, data, folds, k, feats, model[0], facts, pruned, log,
                           command))
        seconds["folds"].append(round(time.time() - t1, 1))
    t2 = time.time()
    oof = _oof_table(src, folds, parts)
    oof["pruned"] = pruned
    metrics = _cv_metrics(oof, cfg, seconds, bool(src.synthetic))
    metrics["n_pruned"] = int(pruned.sum())
    seconds["oof"] = round(time.time() - t2, 1)
    write_csv(cv_dir / OOF_FILE, oof)
    write_json(cv_dir / "cv_metrics.json", metrics)
    cvj = read_cv(cv_dir)
    write_json(cv_dir / "cv.json", {**cvj, "status": "complete", "finished": time.time()})
    log(f"Out-of-fold AUC {metrics['oof_auc']:.4f} (95% CI {metrics['oof_auc_ci'][0]:.4f}-"
        f"{metrics['oof_auc_ci'][1]:.4f}); fold AUCs "
        + ", ".join(f"{a:.4f}" for a in metrics["fold_auc"])
        + f"; {metrics['n_label_issues']:,} likely label errors. Written: {cv_dir / OOF_FILE}")
    return cv_dir


# --------------------------------------------------------------------------- one fold


def _fold_split(folds: np.ndarray, k: int, seed: int, n_folds: int,
                pruned: np.ndarray | None = None) -> Split:
    """Fold k holds out its patches; it trains on the others, less the pruned ones."""
    held = np.flatnonzero(folds == k)
    train = (folds != k) if pruned is None else (folds != k) & ~pruned
    return Split(np.flatnonzero(train), held, f"fold {k} of {n_folds}", seed,
                 round(len(held) / len(folds), 4))


def _head_model(cfg: CVConfig, train_src, body, k: int):
    """Fold k's network: its seeded head on the body the features came from (built without
    weights, then given the body's: the pretrained ones are not read again per fold)."""
    torch.manual_seed(cfg.train.runtime.seed + k)
    no_weights = dataclasses.replace(cfg.train, model=dataclasses.replace(
        cfg.train.model, pretrained=None, init_weights=None))
    model, _, _ = build_for_new_run(no_weights, train_src, lambda *_: None)
    model[0].load_state_dict(body.state_dict())
    return model


def _prune_round(cfg: CVConfig, data: PreparedData, folds: np.ndarray, feats: np.ndarray,
                 body, pruned: np.ndarray, r: int, log) -> np.ndarray:
    """One round of heads fitted in memory (nothing written): the patches confident learning
    flags on its out-of-fold predictions are pruned from the next round's training."""
    labels = np.asarray(data.source.labels, np.int64)
    parts = []
    for k in range(cfg.folds):
        split = _fold_split(folds, k, cfg.train.runtime.seed, cfg.folds, pruned)
        head = head_after_pool(_head_model(cfg, data.source.subset(split.train_idx), body, k))
        fit_head(head, feats, labels, split.train_idx, cfg.head, seed=cfg.train.runtime.seed + k)
        parts.append(_views_frame(data, split.valid_idx,
                                  view_probs(head, feats, split.valid_idx)))
    flagged = _oof_table(data.source, folds, parts)["label_issue"].to_numpy(bool)
    log(f"Prune round {r + 1}: confident learning flags {int(flagged.sum()):,} labels; the "
        "next round trains without them")
    return flagged


def _complete_fold(d: Path, want: TrainConfig) -> pd.DataFrame | None:
    """The held-out view probabilities of a fold run finished with this configuration."""
    prog = read_json(d / "progress.json") or {}
    cfg = read_json(d / "config.json") or {}
    part = d / "oof_views.csv"
    if prog.get("status") != "complete" or not part.exists():
        return None
    theirs = dict(cfg.get("config") or {})
    mine = want.to_dict()
    for c in (theirs, mine):  # the fine-tuning start point is a path inside the same cv dir
        c.get("model", {}).pop("init_weights", None)
    if theirs != mine:
        raise RunError(f"Fold run {d} was trained with another configuration than this "
                       "cross-validation's; its folds would be mixed.", path=d,
                       fix="Start a new cross-validation (another --run-dir), or remove "
                           f"{d} to train the fold again.")
    return pd.read_csv(part, dtype={"id": str})


def _fold(cv_dir: Path, cfg: CVConfig, data: PreparedData, folds: np.ndarray, k: int,
          feats: np.ndarray, body, body_facts: dict, pruned: np.ndarray, log,
          command: str | None) -> pd.DataFrame:
    """Fold k: kept when complete, resumed when its fine-tuning was interrupted, else fitted
    (its head on the features that `body` computed) and written as a run directory."""
    d = fold_dir(cv_dir, k)
    init = cv_dir / "init" / f"fold-{k}.safetensors" if cfg.finetune_epochs else None
    fcfg = fold_config(cfg, cv_dir, k, init)
    done = _complete_fold(d, fcfg)
    if done is not None:
        log(f"Fold {k}: complete, kept ({d})")
        return done
    if cfg.finetune_epochs and (d / "resume.safetensors").exists():
        resume(d, log)
        return _finetuned_views(d, data, folds, k, cfg.views)
    if d.exists():
        shutil.rmtree(d)  # an unfinished fold with no resume point: start it again
    split = _fold_split(folds, k, cfg.train.runtime.seed, cfg.folds, pruned)
    p = prepare_split(data, split, run_dir=d, config=fcfg)
    model = _head_model(cfg, p.train_src, body, k)
    p.facts.update(body_facts)  # model, pretrained weights, input: the same for every fold
    p.facts["crossval"] = {"dir": cv_dir.name, "fold": k, "folds": cfg.folds,
                           "head": asdict(cfg.head), "finetune_epochs": cfg.finetune_epochs,
                           "pruned_from_training": int((pruned & (folds != k)).sum())}
    labels = np.asarray(data.source.labels, np.int64)
    log(f"Fold {k}: head on the features of {len(split.train_idx):,} patches, "
        f"{len(split.valid_idx):,} held out")
    history = fit_head(head_after_pool(model), feats, labels, split.train_idx, cfg.head,
                       seed=cfg.train.runtime.seed + k, valid_rows=split.valid_idx, log=log)
    if cfg.finetune_epochs:
        save_weights(model, init)
        train_prepared(p, log, command=command)
        return _finetuned_views(d, data, folds, k, cfg.views)
    probs = view_probs(head_after_pool(model), feats, split.valid_idx)
    _write_head_run(p, model, history, probs, command)
    return _views_part(d, data, split.valid_idx, probs)


def _write_head_run(p, model, history: list[dict], probs: np.ndarray, command) -> None:
    """A fold whose head was fitted on cached features, as an ordinary complete run: the
    weights (best = last: the head is fitted once), its history and validation predictions
    (of view 0, as an ordinary run records them), metrics.json and progress.json."""
    write_new_run_files(p, command)
    for name in ("best", "last"):
        save_weights(model, p.run_dir / f"{name}.safetensors", {"epoch": len(history) - 1})
    rows = [{"epoch": h["epoch"], "phase": "head (cached features)", "phase_epoch": h["epoch"],
             "train_loss": h["train_loss"], "valid_loss": h.get("valid_loss"),
             "auc": h.get("valid_auc"), "tta_views": probs.shape[1]} for h in history]
    write_csv(p.run_dir / "history.csv", pd.DataFrame(rows))
    p1 = probs[:, 0]
    write_csv(p.run_dir / "valid_predictions.csv",
              pd.DataFrame({"id": list(p.valid_src.ids), "label": p.valid_labels, "prob": p1,
                            "loss": per_patch_losses(p.valid_labels, p1)}))
    last = len(history) - 1
    finish(p, {"epochs_done": len(history), "epochs_total": len(history),
               "best_auc": rows[-1]["auc"], "best_epoch": last})


def _views_frame(data: PreparedData, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """id, p_view0.. of the given rows: a fold's held-out view probabilities."""
    part = pd.DataFrame({"id": [data.source.ids[i] for i in rows]})
    for v in range(probs.shape[1]):
        part[f"p_view{v}"] = probs[:, v]
    return part


def _views_part(d: Path, data: PreparedData, rows: np.ndarray, probs: np.ndarray
                ) -> pd.DataFrame:
    part = _views_frame(data, rows, probs)
    write_csv(d / "oof_views.csv", part)
    return part


def _finetuned_views(d: Path, data: PreparedData, folds: np.ndarray, k: int,
                     views: int) -> pd.DataFrame:
    rows = np.flatnonzero(folds == k)
    loaded = load_run(d)
    engine = engine_for(loaded, len(rows), tta=views, backend="auto")
    probs = predict_probs(loaded, data.source, tta=views, indices=rows, per_view=True,
                          engine=engine)
    write_json(d / "oof_views.csv-metadata.json", {"engine": engine.choice.to_dict()})
    return _views_part(d, data, rows, probs)


# --------------------------------------------------------------------------- the OOF table


def _oof_table(src, folds: np.ndarray, parts: list[pd.DataFrame]) -> pd.DataFrame:
    views = pd.concat(parts, ignore_index=True).set_index("id").reindex(list(src.ids))
    if views.isna().any().any():
        raise RunError("Some patches have no out-of-fold prediction (a fold file is "
                       "incomplete).", fix="Resume the cross-validation again.")
    vp = views.to_numpy(np.float64)
    labels = np.asarray(src.labels, np.int64)
    prob = vp.mean(axis=1)
    df = pd.DataFrame({"id": list(src.ids), "label": labels, "fold": folds, "prob": prob,
                       "tta_spread": vp.std(axis=1) if vp.shape[1] > 1 else 0.0})
    for v in range(vp.shape[1]):
        df[f"p_view{v}"] = vp[:, v]
    issues = label_issues(labels, prob)
    return pd.concat([df, issues], axis=1)


def _cv_metrics(oof: pd.DataFrame, cfg: CVConfig, seconds: dict, synthetic: bool) -> dict:
    y, p = oof["label"].to_numpy(), oof["prob"].to_numpy()
    s = summary(y, p, n_boot=1000)
    fold_auc = [float(roc_auc(g["label"], g["prob"])) for _, g in oof.groupby("fold")]
    return {"oof_auc": s["auc"], "oof_auc_ci": s["auc_ci"], "accuracy": s["accuracy"],
            "fold_auc": fold_auc, "n": int(len(oof)), "n_pos": int(y.sum()),
            "folds": cfg.folds, "views": cfg.views, "finetune_epochs": cfg.finetune_epochs,
            "n_label_issues": int(oof["label_issue"].sum()),
            "mean_tta_spread": float(oof["tta_spread"].mean()),
            "ids_fingerprint": ids_fingerprint(list(oof["id"])), "seconds": seconds,
            "synthetic": synthetic}
