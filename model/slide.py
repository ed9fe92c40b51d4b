"""Tumour heatmap of a whole-slide image under a trained run, with exports for QuPath.

    python -m model.slide                                             # newest run, demo slide
    python -m model.slide runs/<run>                                  # the synthetic demo slide
    python -m model.slide runs/<run> --slide ../shared/data/slides/CMU-1-Small-Region.svs
    python -m model.slide runs/<run> --slide scans/ --out heatmaps/   # every slide of a folder
    torchrun --standalone --nproc_per_node=2 -m model.slide runs/<run> --slide slides.txt

The slide is read at the run's resolution (PCam: 0.972 µm/px; the slide's mpp from its
properties, or --mpp), tissue is found on a thumbnail, and 96 px tiles with a stride of 32 px
are run over the tissue, so that each heatmap cell is P(tumour in its 32x32 box). One folder
per slide (default RUN/slides/<slide>-<hash>/, reused when the slide, run and settings are
unchanged): heatmap.npy + heatmap.json (geometry), overlay.png, tissue.png, regions.geojson
(QuPath: File > Import objects), summary.json. A folder or a list file of slides gives one
folder each and a table slides.csv; under torchrun each process does every WORLD-th slide.
The synthetic slide is also scored against its ground truth (truth_score.json). What is
where: model/slides/.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.core.atomic import write_json
from model.core.cli import add_backend_option, run_cli
from model.core.errors import DataError
from model.core.progress import ProgressFile
from model.evaluation.engine import describe_engine
from model.runs.format import default_runs_root, list_runs
from model.runs.load import load_run, weights_path
from model.slides.heatmap import SlideConfig
from model.slides.job import batch_job, heatmap_job, slide_paths, write_table
from model.slides.score import score_heatmap
from model.slides.synthetic import DEFAULT_SIZE, read_truth, synthetic_slide
from model.training.distributed import env_dist


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.slide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?", default=None,
                   help="the run (default: the newest run under $PCAM_LENS_RUNS or ./runs)")
    p.add_argument("--slide", default=None,
                   help="a slide, a folder of slides or a list file (default: the synthetic "
                        "demo slide with ground truth)")
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (one slide) or folder of result folders (several); "
                        "default RUN_DIR/slides/")
    p.add_argument("--stride", type=int, default=32, help="model px between tiles (32)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability for the tumour regions and area (0.5)")
    p.add_argument("--tta", type=int, default=1, help="dihedral TTA views per tile (1..8)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per level-0 pixel, overriding the slide's (needed for plain images)")
    p.add_argument("--min-tissue", type=float, default=0.05,
                   help="share of a cell that must be tissue for its tile to run (0.05)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_backend_option(p, "tiles")
    p.add_argument("--synthetic-size", type=int, default=DEFAULT_SIZE,
                   help=f"side of the synthetic slide in px at 10x ({DEFAULT_SIZE})")
    p.add_argument("--force", action="store_true", help="recompute even if a result exists")
    p.add_argument("--progress-file", type=Path, default=None,
                   help="also write progress as JSON here (for the viewer)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args) -> SlideConfig:
    return SlideConfig(stride=args.stride, threshold=args.threshold, tta=args.tta,
                       mpp=args.mpp, min_tissue=args.min_tissue, batch_size=args.batch_size,
                       precision=args.precision, device=args.device,
                       backend=args.backend).validate()


def _one(loaded, path: Path, cfg: SlideConfig, args) -> str:
    progress = (ProgressFile(args.progress_file, f"tiles of {path.name}")
                if args.progress_file else not args.no_progress)
    res, reused = heatmap_job(loaded, path, cfg, args.out, progress=progress,
                              reuse=not args.force)
    s = res.summary
    lines = [f"{path.name}: {s['tiles']:,} tiles of {res.meta['grid']['rows']} x "
             f"{res.meta['grid']['cols']} cells ({res.meta['grid']['cell_px_level0']:.1f} "
             f"level-0 px each, level {res.meta['grid']['level']}), tissue "
             f"{s['tissue_mm2']:.2f} mm², tumour {s['tumour_mm2']:.3f} mm² at p >= "
             f"{s['threshold']:g} ({s['regions']} regions), max p {s['max_prob']:.3f}, "
             f"top-10 mean {s['top10_mean_prob']:.3f}"
             + (" (reused)" if reused else
                f"; {s['seconds']['total']:.1f} s, {s['tiles_per_s']:.0f} tiles/s")]
    if not reused and s.get("engine"):
        lines.append(f"engine: {describe_engine(s['engine'])}")
    truth = read_truth(path)
    if truth is not None:
        score = score_heatmap(res.probs, truth, cfg.threshold)
        write_json(res.dir / "truth_score.json", score)
        lines.append(f"against the ground truth: cell AUC {score['cell_auc']}, Dice "
                     f"{score['dice']:.3f}, regions found {score['regions_found']} of "
                     f"{score['regions']} ({json.dumps(score['sensitivity_by_class'])}), "
                     f"{score['false_positives']} false-positive regions")
    lines.append(f"-> {res.dir}")
    return "\n".join(lines)


def _newest_run() -> Path:
    root = default_runs_root()
    for run in list_runs(root):
        if weights_path(run, "best").exists():
            return run
    raise DataError(f"No trained run under {root} to make a heatmap with.",
                    fix="Train one first (python -m model.train), or give RUN_DIR.")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        cfg = _config(args)
        if args.run_dir is None:
            args.run_dir = _newest_run()
            print(f"run: {args.run_dir}")
        loaded = load_run(args.run_dir, args.checkpoint, lazy=True)
        if args.slide is None:
            path, _ = synthetic_slide(args.synthetic_size, log=None if args.no_progress
                                      else print)
            paths = [path]
        else:
            paths = slide_paths(args.slide)
        dist = env_dist()
        if len(paths) == 1 and (dist is None or dist.world == 1):
            print(_one(loaded, paths[0], cfg, args))
            return 0
        root = args.out or Path(args.run_dir) / "slides"
        table = batch_job(loaded, paths, cfg, root, progress=not args.no_progress)
        out = write_table(table, root, dist)
        failed = int((table["status"] == "error").sum()) if len(table) else 0
        mine = f" (this process: {len(table)} of {len(paths)})" if len(table) < len(paths) else ""
        print(f"{len(table)} slides{mine}, {failed} failed" + (f" -> {out}" if out else ""))
        return 2 if failed and failed == len(table) else 0

    return run_cli(body, interrupted="interrupted: finished slides are kept, the unfinished "
                                     "one left nothing")


if __name__ == "__main__":
    raise SystemExit(main())
