"""Step 2 of training: the network (pretrained body + head), the fastai Learner around it,
and the two one-cycle phases (body frozen, then unfrozen with discriminative learning rates).

The loaders move uint8 bytes only; BatchTransform turns each batch into the model's input on
the device (model.nets.transforms). Every epoch is committed by RunRecorder
(model.training.callbacks), so a killed run resumes at the right point of the schedule.
"""
from __future__ import annotations

import sys
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (registers fit_one_cycle and lr_find)
import numpy as np
import pandas as pd
import torch
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import valley
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import RocAucBinary, accuracy

from model.core.atomic import write_csv
from model.core.errors import RunError
from model.data.base import PatchSource
from model.data.batches import PatchDataset, make_loader
from model.nets.archs import HeadConfig, arch_family, build_model
from model.nets.transforms import IMAGENET_MEAN, IMAGENET_STD, InputConfig
from model.nets.weights import load_pretrained_state
from model.runs.format import read_safetensors
from model.training.callbacks import (
    Autocast,
    BatchTransform,
    RunRecorder,
    load_resume_checkpoint,
    save_resume_checkpoint,
)
from model.training.config import TrainConfig
from model.training.distributed import (
    SINGLE,
    Dist,
    make_ddp_callback,
    quiet_learner,
    rank_batch_size,
)
from model.training.prepare import Prepared

LR_FIND_ITERS = 40
DATASET_NORM_SAMPLE = 2000  # patches whose channel statistics give --norm dataset


def resolve_input(config: TrainConfig, train_src: PatchSource, info: dict | None
                  ) -> InputConfig:
    """How patches are fed: the crop and size of the config, and the normalisation statistics
    (of the pretrained weights, of ImageNet, or of a sample of the training patches)."""
    norm = config.input.norm
    if norm == "weights" and info:
        mean, std = info["mean"], info["std"]
    elif norm == "dataset":
        rng = np.random.default_rng(0)
        idx = rng.choice(len(train_src), min(DATASET_NORM_SAMPLE, len(train_src)),
                         replace=False)
        x = train_src.read_batch(np.sort(idx)).astype(np.float64) / 255.0
        mean, std = x.mean((0, 1, 2)).tolist(), x.std((0, 1, 2)).tolist()
    else:
        mean, std, norm = IMAGENET_MEAN, IMAGENET_STD, "imagenet"
    return InputConfig(patch=train_src.size, crop=config.input.crop, size=config.input.size,
                       mean=[float(v) for v in mean], std=[float(v) for v in std],
                       normalisation=norm)


def build_for_new_run(config: TrainConfig, train_src: PatchSource, log):
    """(model, splitter, facts): the network with its pretrained body, and what config.json
    records about it (model, pretrained, input)."""
    arch, wanted = config.model.arch, config.model.pretrained
    state, info = None, None
    if wanted:
        state, info = load_pretrained_state(arch, wanted)
        log(f"Pretrained weights: {info['source']}")
    model, splitter = build_model(arch, len(train_src.classes), state=state, head=HeadConfig())
    if config.model.init_weights:
        load_init_weights(model, Path(config.model.init_weights))
        log(f"Starting weights: {config.model.init_weights}")
    facts = {"model": {"arch": arch, "family": arch_family(arch),
                       "classes": list(train_src.classes), "head": HeadConfig().to_dict()},
             "pretrained": {"requested": wanted, "source": info["source"] if info else None},
             "input": resolve_input(config, train_src, info).to_dict()}
    return model, splitter, facts


def load_init_weights(model, path: Path) -> None:
    """Load a whole network's starting weights (ModelConfig.init_weights) into `model`."""
    state, _ = read_safetensors(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise RunError(f"Starting weights {path} do not fit {type(model).__name__} of this "
                       f"architecture ({str(e).splitlines()[0]}).", path=path,
                       fix="Pass weights saved from a network of the same --arch.") from None


class EpochLines:
    """fastai's metric table as one plain line per epoch, for logs (stdout not a terminal):
    redrawn progress bars would write ~100 KB of carriage returns into a log file."""

    def __init__(self, learn: Learner, log):
        self.learn, self.log = learn, log

    def __call__(self, row) -> None:
        names = list(self.learn.recorder.metric_names)
        if len(row) < len(names) - 1:  # the placeholder row of an epoch skipped on resume
            return
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        self.log("  " + "  ".join(f"{n} {c}" for n, c in zip(names, cells)))


def plain_output(learn: Learner, log) -> None:
    learn.remove_cb(ProgressCallback)
    learn.logger = EpochLines(learn, log)


def make_learner(config: TrainConfig, input_cfg: InputConfig, model, splitter, p: Prepared,
                 dist: Dist | None = None, log=print):
    """`dist` (model.training.distributed.Dist): under torchrun, this rank's shard of each
    epoch with bs/world patches per step (the config's bs is the global batch); rank 0 alone
    shows progress."""
    dist = dist or SINGLE
    rt, bs = config.runtime, config.optim.bs
    train_ds = PatchDataset(p.train_src, p.train_labels)
    valid_ds = PatchDataset(p.valid_src, p.valid_labels)
    train_dl = make_loader(train_ds, rank_batch_size(bs, dist.world), shuffle=True,
                           seed=rt.seed, drop_last=True, rank=dist.rank, world=dist.world,
                           workers=rt.workers)
    valid_dl = make_loader(valid_ds, bs * 2, shuffle=False, workers=rt.workers)
    dls = DataLoaders(train_dl, valid_dl, path=p.run_dir)
    dls._device = torch.device(rt.device)
    batch_tfm = BatchTransform(input_cfg, config.augment.augment_config(), rt.seed,
                               rank=dist.rank)
    cbs = [batch_tfm]
    if rt.precision in ("bf16", "fp16"):
        if rt.device == "cuda" and rt.precision == "fp16":
            cbs.append(MixedPrecision())
        else:
            cbs.append(Autocast(rt.device, torch.bfloat16))
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    # train_bn=False: while frozen, the body gets no gradient at all, so the frozen phase
    # costs a forward pass only (4x faster on CPU); BN running statistics still adapt.
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=splitter,
                    metrics=[accuracy, RocAucBinary()], wd=config.optim.wd, cbs=cbs,
                    path=p.run_dir, model_dir=".tmp", train_bn=False)
    if not dist.is_main:
        quiet_learner(learn)
    elif not sys.stdout.isatty():
        plain_output(learn, log)
    return learn, batch_tfm, train_dl.sampler


def run_lr_find(learn: Learner, run_dir: Path, log) -> float:
    """fastai's learning-rate finder on the frozen model; the curve goes to lr_find.csv."""
    learn.freeze()
    res = learn.lr_find(num_it=LR_FIND_ITERS, show_plot=False, suggest_funcs=(valley,))
    rec = learn.recorder
    n = min(len(rec.lrs), len(rec.losses))
    write_csv(run_dir / "lr_find.csv",
              pd.DataFrame({"lr": [float(v) for v in rec.lrs[:n]],
                            "loss": [float(v) for v in rec.losses[:n]]}))
    log(f"lr_find: valley at {res.valley:.2e} (curve in {run_dir / 'lr_find.csv'})")
    return float(res.valley)


def fit_phases(learn: Learner, config: TrainConfig, p: Prepared, batch_tfm, sampler,
               state: dict, log, resume_from: Path | None = None,
               dist: Dist | None = None) -> None:
    """Run the frozen then the unfrozen one-cycle phase, skipping what `state` says is done.
    `resume_from`: the checkpoint to restore once the resumed phase's freeze state is set.
    `dist`: under torchrun, each fit trains the model wrapped in DistributedDataParallel."""
    sc = config.schedule
    lr = sc.lr
    valid_ids = list(p.valid_src.ids)

    def save_resume(lrn, st):
        save_resume_checkpoint(lrn, st, p.run_dir / "resume.safetensors")

    phases = [("frozen", sc.frozen_epochs, 0), ("unfrozen", sc.epochs, sc.frozen_epochs)]
    for phase, n_epochs, offset in phases:
        if n_epochs <= 0:
            continue
        done_in_phase = 0
        if state.get("epochs_done", 0) >= offset + n_epochs:
            continue  # this phase finished before the interruption
        if state.get("phase") == phase:
            done_in_phase = state.get("phase_epochs_done", 0)
        if phase == "frozen":
            learn.freeze()
            lr_max = lr
        else:
            learn.unfreeze()
            # discriminative learning rates: early layers learn 100x slower than the head
            lr_max = slice(lr / 100, lr / 2)
        if resume_from is not None:
            # after freeze/unfreeze, because fastai's freeze_to() clears the optimizer state;
            # a phase that starts afresh starts with a cleared optimizer, as uninterrupted
            load_resume_checkpoint(learn, resume_from, with_opt=done_in_phase > 0)
            resume_from = None
        rec = RunRecorder(p.run_dir, phase, offset, done_in_phase, state, batch_tfm, sampler,
                          valid_ids, p.valid_labels, save_resume, dist=dist)
        cbs = [rec]
        if dist is not None and dist.enabled:
            cbs.append(make_ddp_callback(dist))
        log(f"Phase {phase}: {n_epochs} epochs" +
            (f", resuming after epoch {done_in_phase}" if done_in_phase else ""))
        learn.fit_one_cycle(n_epochs, lr_max, wd=config.optim.wd, cbs=cbs,
                            start_epoch=done_in_phase)
