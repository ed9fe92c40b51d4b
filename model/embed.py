"""A run's embeddings of a data source and their 2-D map (for the viewer's Map page, similar
patches and near-duplicates).

    python -m model.embed runs/<run> --data ../shared/data/pcam-sample            # UMAP
    python -m model.embed runs/<run> --data DATA --method pca                      # fast

The embeddings (pooled penultimate features) are cached under RUN/embeddings/ per checkpoint,
input and source, with a PCA-reduced copy; the map is cached beside them. What is where:
model/evaluation/embeddings.py.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from model.core.cli import add_backend_option, run_cli
from model.core.progress import ProgressFile
from model.data.open import open_source
from model.evaluation.embeddings import MAP_METHODS, embed_run, embedding_map
from model.evaluation.engine import describe_engine
from model.runs.load import load_run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--data", required=True, help="the data source to embed")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--method", choices=MAP_METHODS, default="umap",
                   help="umap (default; PCA to 64 dimensions first) or pca (seconds)")
    p.add_argument("--views", type=int, default=1,
                   help="average the embeddings over this many TTA views (default 1)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    add_backend_option(p, "patch views")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-file", type=Path, default=None,
                   help="also write progress as JSON here (for the viewer)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        loaded = load_run(args.run_dir, args.checkpoint)
        source = open_source(args.data, args.split, size=loaded.input.patch)
        t0 = time.time()
        progress = (ProgressFile(args.progress_file, "patches embedded") if args.progress_file
                    else not args.no_progress)
        emb = embed_run(loaded, source, views=args.views, progress=progress, log=print,
                        backend=args.backend)
        t1 = time.time()
        embedding_map(emb, args.method, log=print)
        t2 = time.time()
        print(f"{len(emb):,} patches of {source.describe_short()}: embeddings {t1 - t0:.1f} s "
              f"(PCA to {emb.meta['dim']} dimensions keeps "
              f"{emb.meta['explained_variance']:.0%} of the variance), {args.method} map "
              f"{t2 - t1:.1f} s. Cached in {emb.dir}"
              + (f"\nEngine: {describe_engine(emb.meta['engine'])}"
                 if isinstance(emb.meta.get("engine"), dict) else ""))

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
