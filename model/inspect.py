"""Check a data source before training: class balance, colour statistics, and the patches
that would break or distort a run.

    python -m model.inspect DATA [--split train|test] [--json OUT] [--max-items N] [--workers N]

What is checked and how: model/data/inspect.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model.core.atomic import write_json
from model.core.cli import run_cli
from model.core.errors import DataError
from model.core.paths import DATA_SUBDIR
from model.data.base import PatchSource
from model.data.inspect import default_workers, format_table, inspect_source
from model.data.open import open_source
from model.evaluation.duplicates import NEAR_THRESHOLD, duplicate_report


def _json_name(split: str | None) -> str:
    return "inspect.json" if split in (None, "train") else f"inspect-{split}.json"


def default_json_path(data: str, source: PatchSource) -> Path:
    """<data>/.pcam-lens/inspect.json when that folder is writable, else ./inspect.json;
    ./inspect-synthetic.json for the synthetic set. Splits other than train get
    inspect-<split>.json so that train and test reports do not overwrite each other."""
    if source.synthetic:
        return Path("inspect-synthetic.json" if source.split in (None, "train")
                    else f"inspect-synthetic-{source.split}.json")
    root = Path(data).expanduser()
    if root.is_file():
        root = root.parent
    cache = root / DATA_SUBDIR
    try:
        cache.mkdir(exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache / _json_name(source.split)
    except OSError:
        pass
    return Path(_json_name(source.split))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.inspect",
        description="Check a PCam data source before training: class balance, channel\n"
                    "mean/std, unreadable or wrong-size patches, labels without files, files\n"
                    "without labels, duplicate ids, near-black / near-white patches and\n"
                    "converted (grayscale, 16-bit, RGBA) images. Prints a table and writes\n"
                    "the full report as JSON.",
        epilog="exit status:\n"
               "  0  no problems found (near-black/near-white patches, files without labels,\n"
               "     converted and identical images are reported but do not count)\n"
               "  1  problems found that training with --drop-bad drops: unreadable files,\n"
               "     wrong-size patches, labels without files, duplicate ids\n"
               "  2  the data cannot be opened or the report cannot be written (the message\n"
               "     says why)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA",
                   help="Kaggle folder, PCam .h5 folder or _x.h5 file, folder of images, "
                        "class-folder set, or 'synthetic'")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="which split to inspect (default: train)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="where to write the report (default: DATA/.pcam-lens/inspect.json "
                        "when writable, else ./inspect.json)")
    p.add_argument("--max-items", metavar="N", type=int, default=None,
                   help="decode a random sample of N patches (default: all)")
    p.add_argument("--workers", metavar="N", type=int, default=default_workers(),
                   help="decoding threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("duplicates and leakage (instead of the checks)")
    d.add_argument("--duplicates", action="store_true",
                   help="exact duplicates (also flipped/rotated), copies between train and "
                        "test and, with --run, near-duplicates in the run's embeddings and "
                        "the pairs its train/validation split separates")
    d.add_argument("--run", type=Path, metavar="RUN_DIR", help="run for the near-duplicates")
    d.add_argument("--threshold", type=float, default=NEAR_THRESHOLD,
                   help=f"cosine above which two patches are near-duplicates "
                        f"(default {NEAR_THRESHOLD})")
    return p


def duplicates(args) -> int:
    source = open_source(args.data, args.split)
    if not 0 < args.threshold <= 1:
        raise DataError(f"--threshold must be in (0, 1]; got {args.threshold}.")
    print(f"Looking for duplicates in {source.describe_short()}", flush=True)
    report = duplicate_report(source, args.run, args.threshold,
                              progress=not args.no_progress, log=print)
    print(report.format())
    if args.json:
        write_json(Path(args.json), report.to_dict())
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.max_items is not None and args.max_items < 1:
        print("error: --max-items must be at least 1", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2

    def body() -> int:
        if args.duplicates:
            return duplicates(args)
        source = open_source(args.data, args.split, use_pack=False)  # check the files themselves
        print(f"Inspecting {source.describe_short()}", flush=True)
        report = inspect_source(source, progress=not args.no_progress,
                                max_items=args.max_items, workers=args.workers)
        print(format_table(report))
        if report.channel_mean is not None:
            fmt = lambda v: " ".join(f"{x:.4f}" for x in v)  # noqa: E731
            print(f"channel mean (RGB, 0-1): {fmt(report.channel_mean)}")
            print(f"channel std  (RGB, 0-1): {fmt(report.channel_std)}")
        if report.sampled:
            print(f"sampled {report.n_inspected} of {report.n_total} patches (--max-items)")
        out = Path(args.json) if args.json else default_json_path(args.data, source)

        try:
            write_json(out, report.to_dict())
        except OSError as e:
            raise DataError(f"Cannot write the report to {out}: {e}.", path=out,
                            fix="Pass --json with a writable path.") from None
        n_prob, n_out = len(report.problem_indices()), len(report.outlier_indices())
        print(f"{n_prob} problem patches (--drop-bad drops them), {n_out} outliers "
              f"(--drop-outliers drops them); {report.seconds:.1f} s")
        print(f"wrote {out}")
        return 1 if n_prob else 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
