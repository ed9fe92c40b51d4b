"""Predict unlabelled patches and write a Kaggle submission (id,label = P(tumour)).

    python -m model.predict runs/<name> --data ../shared/data/pcam-sample --tta 8
    python -m model.predict runs/<name> --data DATA --shard 0/2 --out part0.csv   # machine 1
    python -m model.predict runs/<name> --data DATA --shard 1/2 --out part1.csv   # machine 2
    python -m model.predict --merge part0.csv part1.csv --data DATA --out submission.csv

--data is a Kaggle folder (its test/ patches, in sample_submission.csv order when that file
exists), a flat folder of images, or a PCam _x.h5 file. The label column holds the probability
of class 1 (Kaggle scores ROC AUC on probabilities). Rows follow the source's order. Files are
written atomically: an interrupted prediction leaves no partial CSV behind.

--shard RANK/WORLD predicts the RANK-th of WORLD contiguous slices and writes a part file with
an extra `index` column; --merge checks that the parts cover every patch of --data exactly once
and writes the submission in source order.

Under torchrun without --shard, the same happens in one command: rank r predicts shard
r/WORLD into a part file beside --out, and rank 0 merges the parts into the submission
(every id exactly once, source order) and removes them:

    torchrun --standalone --nproc_per_node=4 -m model.predict runs/<name> --data DATA --out s.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.core.atomic import write_csv, write_json
from model.core.cli import add_inference_options, run_cli
from model.core.errors import DataError, RunError
from model.data.open import open_source
from model.evaluation.engine import describe_engine
from model.evaluation.predict import (
    _summary,
    merge_parts,
    metadata_path,
    parse_shard,
    predict_source,
)
from model.runs.format import default_submission_path
from model.training import distributed
from model.training.distributed import env_dist


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR",
                   help="the trained run (not needed with --merge when --out is given)")
    p.add_argument("--data", required=True,
                   help="Kaggle folder (test/), flat folder of images, or PCam _x.h5 file")
    p.add_argument("--out", type=Path,
                   help="CSV to write (default RUN_DIR/predictions/<data>-submission.csv)")
    add_inference_options(p)
    p.add_argument("--shard", metavar="RANK/WORLD",
                   help="predict only this contiguous shard; writes a part file (with index)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                   help="merge shard part files into the submission")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> str:
    if args.merge:

        if args.shard:
            raise DataError("--shard and --merge do not go together.")
        if args.out is None and args.run_dir is None:
            raise DataError("--merge needs --out (or RUN_DIR for the default location).",
                            fix="Add --out submission.csv.")
        source = open_source(args.data, split="test")
        df = merge_parts(args.merge, source)
        out = args.out or default_submission_path(args.run_dir, args.data)
        write_csv(out, df)
        return _summary(df, out, f" merged from {len(args.merge)} parts")
    if args.run_dir is None:
        raise RunError("RUN_DIR is required to predict.",
                       fix="python -m model.predict runs/<name> --data PATH")
    if not args.shard:

        d = env_dist()
        if d is not None and d.enabled:
            return run_torchrun(args)
    shard = parse_shard(args.shard) if args.shard else None
    loaded, source, df, record = predict_source(
        args.run_dir, args.data, tta=args.tta, batch_size=args.batch_size,
        checkpoint=args.checkpoint, shard=shard, precision=args.precision,
        compile=args.compile, backend=args.backend, progress=not args.no_progress)
    out = args.out or default_submission_path(args.run_dir, args.data, shard)
    write_csv(out, df)
    write_json(metadata_path(out), record)
    extra = f" (shard {shard[0]}/{shard[1]} of {len(source)})" if shard else ""
    return (_summary(df, out, extra) + f"\nEngine: {describe_engine(record['engine'])}; "
            f"{record['seconds']:.1f} s" + _notes(loaded, source))


def _notes(loaded, source) -> str:
    msg = ""
    if loaded.synthetic or source.synthetic:
        msg += ("\nSYNTHETIC: " + ("the run was trained on the built-in synthetic set"
                                   if loaded.synthetic else "the data is synthetic")
                + "; these probabilities say nothing about real tissue.")
    if source.notes:
        msg += "\nNotes on the data: " + "; ".join(source.notes[:5])
    return msg


def _part_path(out: Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part{rank}of{world}{out.suffix}")


def run_torchrun(args) -> str:
    """One rank of a torchrun job: predict shard RANK/WORLD into a part file beside the output;
    rank 0 then merges every part (merge_parts checks each id is there exactly once), writes
    the submission and removes the parts. Returns the summary on rank 0, "" elsewhere."""

    d = distributed.init("cpu", backend="gloo")  # the processes only meet at barriers
    try:
        out = args.out or default_submission_path(args.run_dir, args.data)
        loaded, source, df, record = predict_source(
            args.run_dir, args.data, tta=args.tta, batch_size=args.batch_size,
            checkpoint=args.checkpoint, shard=(d.rank, d.world), precision=args.precision,
            compile=args.compile, backend=args.backend,
            progress=d.is_main and not args.no_progress)
        write_csv(_part_path(out, d.rank, d.world), df)
        d.barrier()  # every part is written
        if not d.is_main:
            return ""
        parts = [_part_path(out, r, d.world) for r in range(d.world)]
        merged = merge_parts(parts, source)
        write_csv(out, merged)
        write_json(metadata_path(out), dict(record, shard=None, n=len(merged),
                                            processes=d.world))
        for part in parts:
            part.unlink(missing_ok=True)
        return (_summary(merged, out, f" ({d.world} processes)")
                + f"\nEngine (rank 0): {describe_engine(record['engine'])}"
                + _notes(loaded, source))
    finally:
        distributed.shutdown(d)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        msg = run(args)
        if msg:
            print(msg)

    return run_cli(body, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    raise SystemExit(main())
