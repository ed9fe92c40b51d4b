"""Export the review queue as CSV, for review outside the viewer.

    python -m model.queue runs/cv-<name>                         # likely label errors first
    python -m model.queue runs/cv-<name> --order spread --limit 200 --out spread.csv
    python -m model.queue runs/<run> --order top_losses           # a run's validation split

Orders (as in the viewer's Review page): label_errors (cleanlab's ranking of out-of-fold
predictions), spread (widest TTA spread), top_losses, uncertain (closest to 0.5),
false_negatives_first. Patches with a decision in the review log are left out unless
--include-reviewed. Columns: rank, id, label, prob, loss and, for a cross-validation,
label_quality, suggested_label, label_issue, issue_rank, tta_spread, fold; path = the patch's
file where it has one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.core.atomic import write_csv
from model.core.cli import run_cli
from model.core.errors import DataError
from model.oof.queue import build_queue
from model.review.log import QUEUE_ORDERS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.queue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, metavar="RUN_OR_CV",
                   help="a cross-validation directory (model.crossval) or a run directory")
    p.add_argument("--order", default="label_errors",
                   help=f"one of {', '.join(QUEUE_ORDERS)} (dashes allowed: label-errors)")
    p.add_argument("--limit", type=int, help="write only the first N rows")
    p.add_argument("--out", type=Path, help="CSV to write (default RUN_OR_CV/queue-ORDER.csv)")
    p.add_argument("--log", type=Path, help="review log (default: the one beside the data)")
    p.add_argument("--include-reviewed", action="store_true",
                   help="keep patches that already have a decision")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        order = args.order.replace("-", "_")
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit must be a positive whole number; got {args.limit}.")
        q = build_queue(args.path, order, log_path=args.log,
                        include_reviewed=args.include_reviewed)
        table = q.table if args.limit is None else q.table.head(args.limit)
        out = args.out or args.path / f"queue-{order}.csv"
        write_csv(out, table)
        print(f"Queue ({order}) of {q.origin}: {q.n_done:,} of {q.n_total:,} already "
              f"reviewed (log {q.log_path}); {len(table):,} rows written to {out}")
        print(table.head(10).to_string(index=False, max_colwidth=44))

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
