"""Evaluate a trained run on labelled data: metrics, curves and example sets on disk.

    python -m model.evaluate runs/<name>                       # the run's own validation split
    python -m model.evaluate runs/<name> --data ../shared/data/pcam-h5-sample --tta 8

What is written where: model/evaluation/evaluate.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.core.cli import add_inference_options, run_cli
from model.evaluation.evaluate import evaluate_run, format_report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--data", help="labelled data (Kaggle folder, PCam .h5, class folders, "
                                  "synthetic); default: the run's validation split")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval/<data>)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    add_inference_options(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CI")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        res = evaluate_run(args.run_dir, args.data, args.out, checkpoint=args.checkpoint,
                           threshold=args.threshold, tta=args.tta,
                           target_sensitivity=args.target_sensitivity, n_boot=args.n_boot,
                           progress=not args.no_progress, batch_size=args.batch_size,
                           precision=args.precision, compile=args.compile,
                           backend=args.backend)
        print(format_report(res))

    return run_cli(body, interrupted="interrupted: the evaluation did not finish")


if __name__ == "__main__":
    raise SystemExit(main())
