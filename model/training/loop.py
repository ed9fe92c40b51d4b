"""Training as named steps: prepare the data, build the network and learner, write the new
run directory, find the learning rate, fit both phases, finish (metrics.json, progress.json).

    from model.training.config import TrainConfig, DataConfig
    from model.training.loop import train, resume
    run_dir = train(TrainConfig(data=DataConfig(spec="../shared/data/pcam-sample")))
    resume(run_dir)   # after a kill: continues from the last completed epoch

Under torchrun every process runs these steps on its shard of each batch; rank 0 alone writes
and logs (model.training.distributed). A new run that fails before its first epoch completes
removes what it wrote (discard_unstarted_run).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from model.core.atomic import clean_stale_temps, storage_error, write_csv, write_json
from model.core.errors import RunError
from model.core.runtime import resolve_device
from model.evaluation.metrics import summary
from model.nets.archs import splitter_for
from model.nets.transforms import InputConfig
from model.runs.format import (
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    git_commit,
    library_versions,
)
from model.runs.load import model_from_config
from model.training import distributed
from model.training.callbacks import load_resume_checkpoint, save_resume_checkpoint
from model.training.config import TrainConfig
from model.training.distributed import Dist
from model.training.learner import build_for_new_run, fit_phases, make_learner, run_lr_find
from model.training.prepare import Prepared, prepare_new, prepare_resume, read_resumable_config

# what a new run writes before its first epoch completes (see discard_unstarted_run)
_EARLY_RUN_FILES = ("config.json", "train_ids.csv", "valid_ids.csv", "lr_find.csv",
                    "resume.safetensors", "history.csv", "lr_schedule.csv", "last.safetensors",
                    "best.safetensors", "valid_predictions.csv", "progress.json")


def train(config: TrainConfig, log=print, *, command: str | None = None) -> Path:
    """Train a new run; return its directory. `command` is recorded in config.json (the CLI
    passes its command line; library callers get a note that says so)."""
    dist = distributed.init(resolve_device(config.runtime.device))
    try:
        return _train_new(config, dist.quiet(log), dist, command)
    finally:
        distributed.shutdown(dist)


def train_prepared(p: Prepared, log=print, *, command: str | None = None) -> Path:
    """Train a new run on data already prepared and split (model.training.prepare): what
    cross-validation does for each fold, so the data is opened and checked once."""
    dist = distributed.init(resolve_device(p.config.runtime.device))
    try:
        _share_cores(dist)
        return _train_from(p, dist.quiet(log), dist, command)
    finally:
        distributed.shutdown(dist)


def resume(run_dir: str | os.PathLike, log=print) -> Path:
    """Continue an interrupted run from its last completed epoch, with everything taken from
    its directory (config.json, split, resume.safetensors)."""
    run_dir = Path(run_dir)
    cfg = read_resumable_config(run_dir)
    dist = distributed.init(TrainConfig.from_run_config(cfg).runtime.device)
    try:
        return _resume(run_dir, cfg, dist.quiet(log), dist)
    finally:
        distributed.shutdown(dist)


def _share_cores(dist: Dist) -> None:
    # torchrun starts LOCAL_WORLD_SIZE processes on this machine: they share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))


def _train_new(config: TrainConfig, log, dist: Dist, command: str | None) -> Path:
    _share_cores(dist)
    return _train_from(prepare_new(config, log), log, dist, command)


def _train_from(p: Prepared, log, dist: Dist, command: str | None) -> Path:
    p.run_dir = dist.broadcast(p.run_dir)  # the default name holds a time stamp
    if p.run_dir.exists() and (p.run_dir / "config.json").exists():
        raise RunError(f"{p.run_dir} already holds a run.", path=p.run_dir,
                       fix=f"Use --resume {p.run_dir}, or another --run-dir.")
    dist.barrier()  # every rank has looked before rank 0 creates the run
    torch.manual_seed(p.config.runtime.seed)
    model, splitter, model_facts = build_for_new_run(p.config, p.train_src, log)
    p.facts.update(model_facts)
    # the learner first: it reads (preloads) the patches, so bad data stops the run before
    # anything is written
    learn, batch_tfm, sampler = make_learner(p.config, InputConfig.from_dict(p.facts["input"]),
                                             model, splitter, p, dist, log)
    created = not p.run_dir.exists()
    state = {"seed": p.config.runtime.seed, "epochs_done": 0, "history": [],
             "best_auc": -1.0, "best_epoch": None, "epochs_total": p.config.epochs_total}
    try:
        if dist.is_main:
            write_new_run_files(p, command)
        if p.config.schedule.lr_find:
            _find_lr(learn, p, dist, log)
        if dist.is_main:
            save_initial_checkpoint(learn, state, p.run_dir)
        log(f"Run directory: {p.run_dir}")
        fit_phases(learn, p.config, p, batch_tfm, sampler, state, log, None, dist)
    except Exception:
        if state["epochs_done"] == 0 and dist.is_main:  # leave no half-made run
            discard_unstarted_run(p.run_dir, created)
        raise
    return _finish_ranks(p, state, dist, log)


def _resume(run_dir: Path, cfg: dict, log, dist: Dist) -> Path:
    _share_cores(dist)
    p = prepare_resume(run_dir, cfg)
    stale = clean_stale_temps(p.run_dir) if dist.is_main else []  # of a killed write
    if stale:
        log(f"Removed {len(stale)} temporary file(s) of an interrupted write: "
            + ", ".join(stale))
    model = model_from_config(p.facts)
    learn, batch_tfm, sampler = make_learner(p.config, InputConfig.from_dict(p.facts["input"]),
                                             model, splitter_for(p.facts["model"]["arch"]), p,
                                             dist, log)
    resume_from = p.run_dir / "resume.safetensors"
    state = load_resume_checkpoint(learn, resume_from)  # validates it; reloaded per phase
    log(f"Resuming {p.run_dir} after epoch {state['epochs_done']} of {state['epochs_total']}")
    log(f"Run directory: {p.run_dir}")
    fit_phases(learn, p.config, p, batch_tfm, sampler, state, log, resume_from, dist)
    return _finish_ranks(p, state, dist, log)


def _find_lr(learn, p: Prepared, dist: Dist, log) -> None:
    """lr_find on rank 0 alone, with the loader a single process would use; with --lr auto
    its suggestion becomes the run's learning rate (and is written to config.json)."""
    suggestion = None
    if dist.is_main:
        with distributed.whole_train_loader(learn, p.config, dist):
            suggestion = run_lr_find(learn, p.run_dir, log)
    suggestion = dist.broadcast(suggestion)
    if p.config.schedule.lr_auto:
        p.config.schedule.lr = suggestion
        if dist.is_main:
            write_json(p.run_dir / "config.json", {**p.facts, "config": p.config.to_dict()})


def _finish_ranks(p: Prepared, state: dict, dist: Dist, log) -> Path:
    if not dist.is_main:
        dist.barrier()  # until rank 0 has written metrics.json
        return p.run_dir
    metrics = finish(p, state)
    shutil.rmtree(p.run_dir / ".tmp", ignore_errors=True)
    dist.barrier()
    tag = " [SYNTHETIC data]" if metrics.get("synthetic") else ""
    log(f"Done{tag}: validation AUC {metrics['auc']:.4f} "
        f"(95% CI {metrics['auc_ci'][0]:.4f}-{metrics['auc_ci'][1]:.4f}), accuracy "
        f"{metrics['accuracy']:.4f}, best epoch {metrics['best_epoch']}. Run: {p.run_dir}")
    return p.run_dir


def finish(p: Prepared, state: dict) -> dict:
    """metrics.json of the best weights' validation predictions, then progress.json: complete."""
    df = pd.read_csv(p.run_dir / "valid_predictions.csv", dtype={"id": str})
    metrics = summary(df["label"].to_numpy(), df["prob"].to_numpy(), n_boot=1000)
    metrics.update({"checkpoint": "best", "best_epoch": state.get("best_epoch"),
                    "split": "validation",
                    "synthetic": bool(p.facts["data"].get("synthetic"))})
    write_json(p.run_dir / "metrics.json", metrics)
    write_json(p.run_dir / "progress.json",
               {"status": "complete", "epochs_done": state["epochs_done"],
                "epochs_total": state["epochs_total"], "best_auc": state["best_auc"],
                "best_epoch": state["best_epoch"], "updated": time.time()})
    return metrics


def write_new_run_files(p: Prepared, command: str | None = None) -> None:
    """The run directory's first files: the split (train_ids.csv, valid_ids.csv) and
    config.json = the resolved TrainConfig + what the run found out + provenance."""
    try:
        p.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = storage_error(e, p.run_dir)
        if err is None:
            raise
        raise err from None
    cfg_out = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_name": p.run_dir.name,
               "config": p.config.to_dict(), **p.facts,
               "versions": library_versions(), "git_commit": git_commit(),
               "command": command or f"(library call from {Path(sys.argv[0]).name})"}
    write_csv(p.run_dir / "train_ids.csv", pd.DataFrame({"id": p.train_src.ids,
                                                         "label": p.train_labels}))
    write_csv(p.run_dir / "valid_ids.csv", pd.DataFrame({"id": p.valid_src.ids,
                                                         "label": p.valid_labels}))
    write_json(p.run_dir / "config.json", cfg_out)
    p.facts = {k: v for k, v in cfg_out.items() if k != "config"}


def save_initial_checkpoint(learn, state: dict, run_dir: Path) -> None:
    """The resume point before the first epoch (initial weights, fresh optimizer): a run
    killed at any moment of its first epoch, checkpoint writes included, resumes from here."""
    if learn.opt is None:
        learn.create_opt()  # what fit would do first; the state is empty
    save_resume_checkpoint(learn, state, run_dir / "resume.safetensors")
    write_json(run_dir / "progress.json",
               {"status": "running", "phase": None, "epochs_done": 0,
                "epochs_total": state["epochs_total"], "best_auc": None, "best_epoch": None,
                "updated": time.time()})


def discard_unstarted_run(run_dir: Path, created: bool) -> None:
    """Remove what a new run wrote when it failed before completing an epoch: the whole
    folder when this run created it, else only the run's own files."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in _EARLY_RUN_FILES:
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / ".tmp", ignore_errors=True)
    clean_stale_temps(run_dir)
