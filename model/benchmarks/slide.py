"""`python -m model.bench --slide [PATH] --run RUN`: the slide path against the naive loop, in
one process, on the same slide, tiles and model.

- naive: what a first script does, one `read_region` (and resample) and one forward pass
  per tile, over the first `naive_tiles` tissue tiles;
- ours: model.slides.heatmap.compute_heatmap over every tissue tile of the slide (block
  reads, a reader thread, batches of 256), tissue detection timed apart;
- model only: the first `model_tiles` tiles already in memory, through the same engine
  (model.evaluation.inference.predict_arrays): the ceiling reading cannot raise.

Targets (issue 12): ours >= 5x naive, ours >= 80 % of model only (reading is not the limit).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.core.runtime import cpu_has_bf16
from model.data.slides import open_slide
from model.evaluation.inference import predict_batches
from model.nets.transforms import prepare
from model.slides.heatmap import SlideConfig, compute_heatmap
from model.slides.synthetic import synthetic_slide
from model.slides.tiles import ReadStats, iter_tiles, naive_tiles


@dataclass
class SlideBench:
    slide: str
    tiles: int
    naive_tiles_per_s: float
    ours_tiles_per_s: float
    model_patches_per_s: float
    tissue_s: float
    read_s: float
    waited_for_reading_s: float
    threads: int
    backend: str = "eager"

    @property
    def speedup(self) -> float:
        return self.ours_tiles_per_s / self.naive_tiles_per_s

    @property
    def of_model(self) -> float:
        return self.ours_tiles_per_s / self.model_patches_per_s

    def report(self) -> str:
        return "\n".join([
            f"slide bench: {self.slide}, {self.tiles:,} tissue tiles, {self.threads} threads, "
            f"ours and model only with the {self.backend} backend",
            f"  naive (read_region + forward per tile) {self.naive_tiles_per_s:8.1f} tiles/s",
            f"  ours  (block reads, reader thread)     {self.ours_tiles_per_s:8.1f} tiles/s  "
            f"= {self.speedup:.1f}x naive (target >= 5x)",
            f"  model only (tiles in memory)           {self.model_patches_per_s:8.1f} "
            f"patches/s: ours is {self.of_model:.0%} of it (target >= 80 %)",
            f"  tissue detection {self.tissue_s:.2f} s (apart); reading {self.read_s:.1f} s in "
            f"the reader thread, of which the model waited {self.waited_for_reading_s:.1f} s"])


def _naive(loaded, slide, grid, order: np.ndarray) -> float:
    """A first script: read a tile, transform it, one plain forward pass (the same precision
    as ours), next tile; no engine in between."""
    model = loaded.model
    dev = next(model.parameters()).device

    def one(tile: np.ndarray) -> None:
        x = prepare(torch.from_numpy(tile[None]).to(dev), loaded.input)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
            torch.softmax(model(x).float(), 1)

    with torch.inference_mode():
        one(next(naive_tiles(slide, grid, order[:1])))  # warm up
        t0 = time.perf_counter()
        for tile in naive_tiles(slide, grid, order):
            one(tile)
    return len(order) / (time.perf_counter() - t0)


def bench_slide(loaded, slide_path: str | Path | None, naive_tiles: int = 256,
                model_tiles: int = 4096, cfg: SlideConfig | None = None) -> SlideBench:
    cfg = cfg or SlideConfig()
    if slide_path is None:
        slide_path, _ = synthetic_slide()
    slide = open_slide(slide_path, mpp=cfg.mpp)
    try:
        stats = ReadStats()
        hm = compute_heatmap(loaded, slide, cfg, progress=False, stats=stats)
        ours = hm.tiles / hm.seconds["tiles"]
        order = hm.cells
        head = order[:model_tiles]
        x = np.concatenate([b.numpy() for _, b in iter_tiles(slide, hm.grid, head, 256)])
        batches = [(s, torch.from_numpy(x[s:s + 256])) for s in range(0, len(x), 256)]
        predict_batches(loaded, batches[:1], 256, progress=False, backend=cfg.backend)  # warm
        t0 = time.perf_counter()
        predict_batches(loaded, batches, len(x), progress=False, backend=cfg.backend)
        model_rate = len(x) / (time.perf_counter() - t0)
        naive = _naive(loaded, slide, hm.grid, order[:naive_tiles])
        return SlideBench(slide=str(slide_path), tiles=hm.tiles, naive_tiles_per_s=naive,
                          ours_tiles_per_s=ours, model_patches_per_s=model_rate,
                          tissue_s=hm.seconds["tissue"], read_s=stats.read_s,
                          waited_for_reading_s=stats.wait_s, threads=torch.get_num_threads(),
                          backend=cfg.backend)
    finally:
        slide.close()
