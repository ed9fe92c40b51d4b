"""Out-of-fold predictions for every labelled patch, and the labels most likely wrong.

    python -m model.crossval --data ../shared/data/pcam-sample            # K = 5, head only
    python -m model.crossval --data DATA --folds 10 --finetune-epochs 1    # + 1 unfrozen epoch
    python -m model.crossval --resume runs/cv-<name>                       # after a kill

Every patch is held out by exactly one fold (stratified, or grouped by slide when the data has
slide ids) and predicted by the model that did not train on it. The pooled features of the
frozen pretrained body are computed once for all patches and the 8 dihedral views; each fold
fits the network's head on them (seconds), and optionally fine-tunes the whole network with
the ordinary trainer (--finetune-epochs). Writes a cross-validation directory (layout:
model/runs/crossval.py) whose fold runs are ordinary run directories, oof_predictions.csv with
cleanlab's label quality per patch, and cv_metrics.json. The directory also serves as an
ensemble: python -m model.evaluate CV_DIR --data HELD_OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.core.cli import run_cli
from model.nets.archs import DEFAULT_ARCH
from model.oof.crossval import CVConfig, resume_crossval, run_crossval
from model.oof.heads import HeadFit
from model.training.config import (
    SCHEDULES,
    DataConfig,
    InputChoice,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    SplitConfig,
    TrainConfig,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.crossval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="labelled data: Kaggle folder, PCam .h5, class folders, "
                                  "or 'synthetic'")
    d.add_argument("--folds", type=int, default=5, help="K (default 5)")
    d.add_argument("--split", choices=["auto", "stratified", "grouped"], default="auto",
                   help="auto = grouped by slide when slide ids exist, else stratified")
    d.add_argument("--max-items", type=int, help="a stratified random subset of this size")
    d.add_argument("--no-checks", action="store_true", help="skip the dataset checks")
    d.add_argument("--drop-bad", action="store_true", help="drop unusable patches")
    d.add_argument("--labels-from-review", nargs="?", const="default", metavar="LOG",
                   help="apply the review log first (relabels; flagged patches dropped)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default=DEFAULT_ARCH)
    m.add_argument("--pretrained", choices=["auto", "pip", "hub"], default="auto")
    m.add_argument("--no-pretrained", action="store_true",
                   help="a randomly initialised body (only for tests: its features are noise)")
    m.add_argument("--crop", type=int, help="centre crop (default 96: the whole patch)")
    m.add_argument("--size", type=int, help="network input side (default: the crop)")
    m.add_argument("--norm", choices=["weights", "imagenet", "dataset"], default="weights")
    t = p.add_argument_group("training")
    t.add_argument("--head-epochs", type=int, default=HeadFit.epochs,
                   help=f"epochs of the head on the cached features (default {HeadFit.epochs})")
    t.add_argument("--head-lr", type=float, default=HeadFit.lr)
    t.add_argument("--finetune-epochs", type=int, default=0,
                   help="unfrozen epochs of the ordinary trainer after the head (default 0)")
    t.add_argument("--preset", choices=["auto", *sorted(SCHEDULES)], default="auto",
                   help="the fine-tuning schedule's learning rate, batch and weight decay")
    t.add_argument("--lr", type=float, help="fine-tuning learning rate")
    t.add_argument("--bs", type=int)
    t.add_argument("--prune-rounds", type=int, default=0,
                   help="rounds of confident learning's prune-then-retrain: the labels a round "
                        "flags are left out of the next round's training (default 0)")
    t.add_argument("--views", type=int, default=8, help="TTA views per patch (default 8)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    t.add_argument("--workers", type=int)
    o = p.add_argument_group("output")
    o.add_argument("--run-dir", type=Path, help="default: runs/cv-<time>-<arch>-<data>")
    o.add_argument("--features-cache", type=Path, metavar="DIR",
                   help="where the pooled features are cached (default CV_DIR/features); "
                        "share one between cross-validations of the same patches")
    o.add_argument("--resume", type=Path, metavar="CV_DIR",
                   help="continue an interrupted cross-validation")
    return p


def config_from_args(args) -> CVConfig:
    train = TrainConfig(
        data=DataConfig(spec=str(args.data), max_items=args.max_items,
                        checks=not args.no_checks, drop_bad=args.drop_bad,
                        labels_from_review=args.labels_from_review),
        split=SplitConfig(method=args.split),
        model=ModelConfig(arch=args.arch,
                          pretrained=None if args.no_pretrained else args.pretrained),
        input=InputChoice(crop=args.crop, size=args.size, norm=args.norm),
        schedule=ScheduleConfig(preset=args.preset, lr=args.lr, lr_find=False),
        optim=OptimConfig(bs=args.bs),
        runtime=RuntimeConfig(seed=args.seed, device=args.device, precision=args.precision,
                              workers=args.workers),
        run_dir=None if args.run_dir is None else str(args.run_dir))
    return CVConfig(train=train, folds=args.folds,
                    head=HeadFit(epochs=args.head_epochs, lr=args.head_lr),
                    finetune_epochs=args.finetune_epochs, views=args.views,
                    prune_rounds=args.prune_rounds,
                    features_dir=None if args.features_cache is None
                    else str(args.features_cache))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = " ".join([Path(sys.executable).name, "-m", "model.crossval",
                        *(sys.argv[1:] if argv is None else argv)])

    def body():
        if args.resume:
            resume_crossval(args.resume)
        elif args.data is None:
            get_args_parser().error("--data is required (or --resume CV_DIR)")
        else:
            run_crossval(config_from_args(args), command=command)

    return run_cli(body, interrupted="interrupted: finished folds are kept; continue with "
                                     "--resume CV_DIR")


if __name__ == "__main__":
    raise SystemExit(main())
