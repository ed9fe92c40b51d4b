"""A run's tumour heatmap over a whole slide.

    loaded = load_run("runs/<name>")
    hm = compute_heatmap(loaded, open_slide("slide.svs"), SlideConfig())
    hm.probs        # float32 [rows, cols]: P(tumour in the cell's 32x32 box); NaN = no tissue

Tissue is found on a thumbnail (model.slides.tissue), the cells whose centre box holds at
least `min_tissue` tissue are tiled (model.slides.tiles: block reads, a reader thread) and
run through the same inference engine as `model.predict`
(model.evaluation.inference.predict_batches: batched, bf16 on capable CPUs, AMP on CUDA,
TTA), and the probabilities are put back at their cells.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from model.core.errors import DataError
from model.data.slides import Slide
from model.evaluation.inference import check_tta, engine_for, predict_batches
from model.slides.geometry import SlideGrid, plan_grid
from model.slides.tiles import ReadStats, iter_tiles, tile_order
from model.slides.tissue import TissueMask, detect_tissue

THUMB_PX_PER_CELL = 4  # the tissue mask resolves a quarter of a cell
THUMB_MIN, THUMB_MAX = 1024, 4096
TOP_K = 10  # the slide score: the mean of the top-k cells (and the max)


@dataclass(frozen=True)
class SlideConfig:
    """How a slide is turned into a heatmap (everything that changes the result)."""

    stride: int = 32
    threshold: float = 0.5
    tta: int = 1
    min_tissue: float = 0.05  # share of a cell's centre box that must be tissue; 0 = all cells
    mpp: float | None = None  # µm/px of level 0, overriding the slide's own
    batch_size: int = 256
    precision: str = "auto"
    device: str | None = None
    backend: str = "eager"  # or auto / onnx / compile (model.evaluation.engine.BACKENDS)

    def validate(self) -> SlideConfig:
        check_tta(self.tta)
        if not 0 < self.threshold < 1:
            raise DataError(f"The threshold must lie between 0 and 1; got {self.threshold}.",
                            fix="Use e.g. --threshold 0.5.")
        if not 0 <= self.min_tissue <= 1:
            raise DataError(f"min_tissue must lie between 0 and 1; got {self.min_tissue}.")
        return self

    def result_key(self) -> dict:
        """The settings a cached heatmap must match (batch size and device do not change it
        beyond float noise)."""
        d = asdict(self)
        for k in ("batch_size", "device", "threshold", "backend"):
            d.pop(k)
        return d


@dataclass
class SlideHeatmap:
    probs: np.ndarray  # float32 [rows, cols], NaN where no tile was run
    grid: SlideGrid
    tissue: TissueMask
    thumb: np.ndarray  # uint8 RGB thumbnail of the whole slide
    thumb_downsample: float
    cells: np.ndarray  # [n, 2] (row, col) of the tiles, in the order they were run
    seconds: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # what ran (model.evaluation.engine)

    @property
    def tiles(self) -> int:
        return len(self.cells)


def thumb_side(slide: Slide, grid: SlideGrid) -> int:
    want = max(grid.rows, grid.cols) * THUMB_PX_PER_CELL
    return int(min(max(want, THUMB_MIN), THUMB_MAX, max(slide.dimensions)))


def tissue_cells(slide: Slide, grid: SlideGrid, min_tissue: float
                 ) -> tuple[np.ndarray, TissueMask, np.ndarray, float]:
    """(cells [n, 2] to run, tissue mask, thumbnail, its downsample)."""
    thumb, ds = slide.thumbnail(thumb_side(slide, grid))
    tissue = detect_tissue(thumb, ds, slide.mpp)
    frac = tissue.cell_fraction(grid)
    # min_tissue 0: every cell of the slide, tissue or not (a faint stain the mask misses)
    cells = np.argwhere(frac >= min_tissue) if min_tissue > 0 else np.argwhere(frac >= -1)
    if len(cells) == 0:
        raise DataError(f"No tissue found on {slide.path} (saturation threshold "
                        f"{tissue.threshold}/255 on a {thumb.shape[1]}x{thumb.shape[0]} "
                        "thumbnail): an empty or very faint slide.",
                        fix="Check that this is a stained slide; a faint one may need "
                            "--min-tissue 0.")
    return cells, tissue, thumb, ds


def compute_heatmap(loaded, slide: Slide, cfg: SlideConfig, progress=True,
                    stats: ReadStats | None = None) -> SlideHeatmap:
    """The heatmap of `slide` under the run `loaded` (a model.runs.load.LoadedRun)."""
    cfg.validate()
    t0 = time.perf_counter()
    grid = plan_grid(slide, stride=cfg.stride, patch=loaded.input.patch)
    cells, tissue, thumb, ds = tissue_cells(slide, grid, cfg.min_tissue)
    t1 = time.perf_counter()
    order = tile_order(cells)
    stats = stats if stats is not None else ReadStats()
    batches = iter_tiles(slide, grid, order, cfg.batch_size, stats=stats)
    engine = engine_for(loaded, len(order), tta=cfg.tta, backend=cfg.backend,
                        precision=cfg.precision, device=cfg.device)
    p = predict_batches(loaded, batches, len(order), tta=cfg.tta, progress=progress,
                        engine=engine, desc=f"{slide.name}: {len(order):,} tiles")
    t2 = time.perf_counter()
    probs = np.full((grid.rows, grid.cols), np.nan, np.float32)
    probs[order[:, 0], order[:, 1]] = p
    seconds = {"tissue": round(t1 - t0, 3), "tiles": round(t2 - t1, 3),
               "read": round(stats.read_s, 3), "waited_for_reading": round(stats.wait_s, 3),
               "total": round(t2 - t0, 3)}
    return SlideHeatmap(probs=probs, grid=grid, tissue=tissue, thumb=thumb,
                        thumb_downsample=ds, cells=order, seconds=seconds,
                        engine=engine.choice.to_dict())


def tumour_mm2(probs: np.ndarray, grid: SlideGrid, threshold: float) -> float:
    """Area of the cells at or above `threshold` (cells never run count as no tumour)."""
    return float((np.nan_to_num(probs, nan=-1.0) >= threshold).sum() * grid.cell_area_mm2)


def summarise(hm: SlideHeatmap, threshold: float, slide: Slide) -> dict:
    """Areas in mm², the slide score (max and top-k mean probability), tiles, seconds."""
    vals = hm.probs[np.isfinite(hm.probs)]
    px_mm2 = (hm.thumb_downsample * slide.mpp / 1000) ** 2
    top = np.sort(vals)[::-1][:TOP_K]
    n = max(hm.seconds.get("tiles", 0.0), 1e-9)
    return {"slide": str(slide.path), "tiles": hm.tiles,
            "tissue_mm2": round(float(hm.tissue.mask.sum() * px_mm2), 4),
            "tumour_mm2": round(tumour_mm2(hm.probs, hm.grid, threshold), 4),
            "threshold": threshold,
            "max_prob": round(float(vals.max()), 6) if vals.size else None,
            f"top{TOP_K}_mean_prob": round(float(top.mean()), 6) if top.size else None,
            "seconds": hm.seconds, "tiles_per_s": round(hm.tiles / n, 1),
            "engine": hm.engine}
