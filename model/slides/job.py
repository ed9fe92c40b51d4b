"""Slide jobs: one slide to a finished result folder (reused when it exists), or a batch of
slides (a folder or a list file: a hospital's night run) with a summary table, sharded over
torchrun's processes so that each slide is done exactly once.

    res = heatmap_job(loaded, "slide.svs", SlideConfig(), out=None)   # RUN/slides/<name>
    table = batch_job(loaded, slide_paths(arg), SlideConfig(), out_root)
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd

from model.core.atomic import write_csv, write_json
from model.core.errors import DataError, PcamLensError
from model.data.slides import OPENSLIDE_SUFFIXES, open_slide
from model.runs.load import weights_path
from model.slides.geometry import SlideGrid
from model.slides.heatmap import SlideConfig, compute_heatmap, summarise, tumour_mm2
from model.slides.outputs import (
    SlideResult,
    read_result,
    regions_geojson,
    result_key,
    write_result,
)
from model.slides.tiles import ReadStats
from model.training.distributed import Dist, env_dist

SUMMARY_TABLE = "slides.csv"


def folder_name(slide_path: Path) -> str:
    """<slide name>-<6 hex of its path>: two slides of one name in different folders do not
    collide."""
    tag = hashlib.sha1(str(Path(slide_path).resolve()).encode()).hexdigest()[:6]
    return f"{Path(slide_path).stem}-{tag}"


def default_out(run_dir: Path, slide_path: Path) -> Path:
    """RUN/slides/<folder_name>: cached per run and slide."""
    return Path(run_dir) / "slides" / folder_name(slide_path)


def run_meta(run_dir: Path, checkpoint: str = "best") -> dict:
    """The run's weights a heatmap was made with (known without loading them)."""
    path = weights_path(Path(run_dir), checkpoint)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = None
    return {"run_dir": str(Path(run_dir).resolve()), "checkpoint": path.stem,
            "checkpoint_mtime": mtime}


def _finished(slide, run_dir: Path, checkpoint: str, cfg: SlideConfig, out: Path
              ) -> tuple[SlideResult | None, str]:
    """(the finished result in `out` if its key matches, the key)."""
    key = result_key(slide, run_meta(run_dir, checkpoint), cfg.result_key())
    res = read_result(out)
    return (res if res is not None and res.meta.get("key") == key else None), key


def find_result(run_dir: Path, checkpoint: str, slide_path, cfg: SlideConfig,
                out: Path | None = None) -> SlideResult | None:
    """The finished heatmap of this run, slide and settings, if there is one (no model is
    loaded: the viewer asks this on every rerun)."""
    slide = open_slide(slide_path, mpp=cfg.mpp)
    try:
        out = Path(out) if out is not None else default_out(run_dir, slide.path)
        return _finished(slide, run_dir, checkpoint, cfg, out)[0]
    finally:
        slide.close()


def heatmap_job(loaded, slide_path, cfg: SlideConfig, out: Path | None = None,
                progress=True, reuse: bool = True) -> tuple[SlideResult, bool]:
    """(result, reused): the heatmap of one slide in its folder, computed or reused."""
    cfg.validate()
    slide = open_slide(slide_path, mpp=cfg.mpp)
    try:
        out = Path(out) if out is not None else default_out(loaded.run_dir, slide.path)
        old, key = _finished(slide, loaded.run_dir, loaded.checkpoint, cfg, out)
        if old is not None and reuse:
            if old.summary.get("threshold") != cfg.threshold:
                old = rethreshold(old, cfg.threshold)
            return old, True
        hm = compute_heatmap(loaded, slide, cfg, progress=progress, stats=ReadStats())
        meta = {"key": key, "run": run_meta(loaded.run_dir, loaded.checkpoint),
                "settings": cfg.result_key(),
                "backend": {"device": str(cfg.device or "auto"), "precision": cfg.precision,
                            "engine": cfg.backend},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return write_result(out, hm, slide, summarise(hm, cfg.threshold, slide), meta,
                            cfg.threshold), False
    finally:
        slide.close()


def rethreshold(res: SlideResult, threshold: float) -> SlideResult:
    """The same heatmap with the regions and tumour area of another threshold (no
    inference); rewritten in place, file by file (each atomic)."""
    grid: SlideGrid = res.grid
    geo = regions_geojson(res.probs, grid, threshold, Path(res.meta["slide"]["path"]).stem)
    summary = {**res.summary, "threshold": threshold, "regions": len(geo["features"]),
               "tumour_mm2": round(tumour_mm2(res.probs, grid, threshold), 4)}
    write_json(res.dir / "regions.geojson", geo)
    write_json(res.dir / "summary.json", summary)
    return SlideResult(dir=res.dir, probs=res.probs, meta=res.meta, summary=summary)


def slide_paths(arg: str | Path) -> list[Path]:
    """The slides named by --slide: one file, every slide in a folder (sorted, not
    recursive), or a text file with one path per line (# comments, relative to the file)."""
    p = Path(arg).expanduser()
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.is_file()
                       and q.suffix.lower() in OPENSLIDE_SUFFIXES)
        if not found:
            raise DataError(f"The folder {p} holds no slides ({', '.join(OPENSLIDE_SUFFIXES)}).",
                            fix="Give a folder of slides, one slide, or a list file.")
        return found
    if p.suffix.lower() in (".txt", ".lst", ".list", ".csv"):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"Cannot read the slide list {p}: {e.strerror}.",
                            fix="Check the path.") from None
        paths = []
        for line in lines:
            line = line.split("#")[0].strip().split(",")[0].strip()
            if line and line.lower() not in ("path", "slide"):
                q = Path(line).expanduser()
                paths.append(q if q.is_absolute() else p.parent / q)
        if not paths:
            raise DataError(f"The slide list {p} names no slides.",
                            fix="Write one slide path per line.")
        return paths
    return [p]


def shard_of(paths: list[Path], dist: Dist | None) -> list[Path]:
    """This process's slides under torchrun: every WORLD-th from RANK, so that each slide is
    done exactly once and the shards have about equal counts."""
    if dist is None or dist.world <= 1:
        return paths
    return paths[dist.rank::dist.world]


def batch_job(loaded, paths: list[Path], cfg: SlideConfig, out_root: Path,
              progress=True, log=print) -> pd.DataFrame:
    """Every slide of `paths` (this process's shard) into out_root/<name>; a slide that fails
    (bad file, no tissue) is reported in the table and the batch goes on."""
    rows = []
    for path in shard_of(paths, env_dist()):
        t0 = time.perf_counter()
        try:
            res, reused = heatmap_job(loaded, path, cfg, Path(out_root) / folder_name(path),
                                      progress=progress)
            s = res.summary
            rows.append({"slide": str(path), "status": "reused" if reused else "done",
                         "out": str(res.dir), "tiles": s["tiles"],
                         "tissue_mm2": s["tissue_mm2"], "tumour_mm2": s["tumour_mm2"],
                         "max_prob": s["max_prob"], "top10_mean_prob": s.get("top10_mean_prob"),
                         "regions": s.get("regions"), "seconds": round(time.perf_counter() - t0, 1),
                         "error": ""})
            log(f"{path.name}: {s['tiles']:,} tiles, max p {s['max_prob']:.3f}, tumour "
                f"{s['tumour_mm2']:.2f} mm² -> {res.dir}" + (" (reused)" if reused else ""))
        except PcamLensError as e:
            rows.append({"slide": str(path), "status": "error", "out": "", "error": str(e)})
            log(f"{path.name}: error: {e}")
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, root: Path, dist: Dist | None, poll_s: float = 2.0
                ) -> Path | None:
    """root/slides.csv. Under torchrun each rank writes its part; rank 0 waits for every part
    (a file barrier: no process-group timeout however long a slide takes; torchrun stops
    all ranks if one fails), merges them in slide order and removes them. None on ranks > 0."""
    root = Path(root)
    out = root / SUMMARY_TABLE
    if dist is None or dist.world <= 1:
        write_csv(out, table)
        return out
    parts = [root / f"slides.part{r}of{dist.world}.csv" for r in range(dist.world)]
    write_csv(parts[dist.rank], table)
    if not dist.is_main:
        return None
    while not all(p.exists() for p in parts):
        time.sleep(poll_s)
    merged = pd.concat([pd.read_csv(p, keep_default_na=False) for p in parts],
                       ignore_index=True)
    write_csv(out, merged)
    for p in parts:
        p.unlink(missing_ok=True)
    return out

