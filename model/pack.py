"""Pack a Kaggle folder (or PCam HDF5 folder) into one memory-mapped array.

    python -m model.pack DATA [--split train|test|all] [--out DIR] [--force] [--workers N]
    python -m model.pack --verify DIR

The pack format, where packs live and when they are fresh: model/data/pack.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from model.core.cli import run_cli
from model.core.errors import PcamLensError
from model.core.paths import DATA_SUBDIR
from model.data.open import open_source
from model.data.pack import default_workers, verify_pack
from model.data.packing import pack


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.pack",
        description="Pack a Kaggle folder (or PCam HDF5 folder) into one memory-mapped array,\n"
                    "which open_source then uses instead of decoding the files, as long as\n"
                    "the folder does not change.",
        epilog="exit status: 0 packed or already up to date (verify: intact); 1 --verify "
               "found a damaged pack; 2 the data cannot be packed (the message says why)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", nargs="?", help="the data folder to pack")
    p.add_argument("--split", choices=["train", "test", "all"], default="train",
                   help="which split (default: train; all = train and, if present, test)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write DIR/pack-<split>/ instead of DATA/.pcam-lens/pack-<split>/ "
                        "(open it with --data DIR)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="decoding threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", metavar="DIR", default=None,
                   help="recompute the sha256 of the pack in DIR (a pack-<split> folder, or a "
                        "folder holding them) and exit")
    return p


def _verify_cli(where: Path) -> int:
    dirs = [where] if (where / "pack.json").exists() else sorted(
        d for d in list(where.glob("pack-*")) + list((where / DATA_SUBDIR).glob("pack-*"))
        if (d / "pack.json").exists())
    if not dirs:
        print(f"error: no pack in {where}", file=sys.stderr)
        return 2
    bad = 0
    for d in dirs:
        ok = verify_pack(d)
        bad += not ok
        print(f"{'ok     ' if ok else 'DAMAGED'} {d}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.verify:
        return _verify_cli(Path(args.verify).expanduser())
    if not args.data:
        print("error: DATA is required (or --verify DIR)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    splits = ["train", "test"] if args.split == "all" else [args.split]

    def body() -> int:
        for split in splits:
            if args.split == "all" and split == "test":

                try:
                    test_src = open_source(args.data, "test", use_pack=False)
                    train_src = open_source(args.data, "train", use_pack=False)
                except PcamLensError:
                    print("no test split to pack")
                    continue
                if test_src.split == train_src.split and test_src.ids == train_src.ids:
                    print("no separate test split to pack")
                    continue
            t0 = time.perf_counter()
            target, built = pack(args.data, split, out=args.out, force=args.force,
                                 workers=args.workers, progress=not args.no_progress)
            if built:
                meta = json.loads((target / "pack.json").read_text(encoding="utf-8"))
                dt = time.perf_counter() - t0
                print(f"packed {meta['n']} patches ({meta['source_kind']} {meta['split']}) "
                      f"into {target} ({meta['n'] * int(np.prod(meta['shape'][1:])) / 1e6:.0f} "
                      f"MB) in "
                      f"{dt:.1f} s ({meta['n'] / max(dt, 1e-9):.0f} patches/s)")
            else:
                print(f"up to date: {target} (--force rebuilds it)")
        return 0

    return run_cli(body, interrupted="interrupted; nothing was left behind")


if __name__ == "__main__":
    raise SystemExit(main())
