"""Where the model's patches lie on a slide: resolution matching and the grid of cells.

PCam patches are 96 px at 10x, 0.972 µm/px (level 2 of Camelyon16's 0.243 µm/px scans), and
a label says whether the centre 32x32 holds tumour. A slide is read at that resolution: the
pyramid level at or above it (downsample <= target / slide mpp) is read and shrunk by the
remaining factor. With a stride of 32 model px the centre boxes of the tiles tile the slide
exactly, so heatmap cell (r, c) is the probability that its 32x32 region holds tumour, the
label's own definition, and tile (r, c) is that box with its 32 px context rim:

    cell (r, c)  = level-0 box [c * cell0, (c + 1) * cell0) x [r * cell0, (r + 1) * cell0)
    tile (r, c)  = the 96 px model patch whose centre 32x32 is cell (r, c)
    cell0        = stride * factor level-0 px, factor = model mpp / slide mpp

A stride other than 32 still places each tile's centre box at the cell (cells then overlap
or leave gaps, and the heatmap's cell is `stride` px wide).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from model.core.errors import DataError
from model.data.base import CENTRE, PATCH
from model.data.slides import Slide

PCAM_MPP = 0.972  # µm per pixel of PCam's patches (Camelyon16 level 2)
MATCH_TOLERANCE = 0.02  # a level within 2 % of the target is used as it is (no resampling)
MAX_UPSAMPLE = 1.5  # a slide coarser than this times the target cannot be matched


@dataclass(frozen=True)
class SlideGrid:
    """The geometry of a heatmap: which level is read, how it is resampled, the cells."""

    level: int
    level_downsample: float
    factor: float  # model pixel = factor level-0 pixels
    scale: float  # model pixel = scale level pixels (resampling of the read region)
    stride: int  # model px between neighbouring tiles (= cell side in model px)
    patch: int  # model px per tile side
    rows: int
    cols: int
    slide_mpp: float
    model_mpp: float  # what the model sees: the target, or the matched level's within 2 %

    @property
    def cell0(self) -> float:
        """Cell side in level-0 pixels."""
        return self.stride * self.factor

    @property
    def rim(self) -> int:
        """Model px from a tile's edge to its centre box."""
        return (self.patch - self.stride) // 2

    def cell_box0(self, r: int, c: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of cell (r, c) in level-0 pixels."""
        s = self.cell0
        return c * s, r * s, (c + 1) * s, (r + 1) * s

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(cell_px_level0=self.cell0, tile_px_level0=self.patch * self.factor,
                 origin_level0=[0, 0], rim_px=self.rim, cell_area_mm2=self.cell_area_mm2)
        return d

    @property
    def cell_area_mm2(self) -> float:
        side_mm = self.cell0 * self.slide_mpp / 1000
        return side_mm * side_mm


def choose_level(slide: Slide, factor: float) -> int:
    """The coarsest level still at or above the target resolution (downsample <= factor,
    within the matching tolerance), so that reading never upsamples."""
    ok = [k for k, d in enumerate(slide.level_downsamples) if d <= factor * (1 + MATCH_TOLERANCE)]
    return max(ok, key=lambda k: slide.level_downsamples[k]) if ok else 0


def plan_grid(slide: Slide, *, stride: int = CENTRE, patch: int = PATCH,
              model_mpp: float = PCAM_MPP) -> SlideGrid:
    """The grid of `stride`-px cells at `model_mpp` covering the whole slide."""
    if not isinstance(stride, int) or not 1 <= stride <= patch:
        raise DataError(f"The stride must be a whole number of model pixels from 1 to {patch}; "
                        f"got {stride!r}.", fix="Use --stride 32 (PCam's centre box).")
    factor = model_mpp / slide.mpp
    if factor < 1 / MAX_UPSAMPLE:
        raise DataError(f"{slide.path} is scanned at {slide.mpp:g} µm/px, coarser than the "
                        f"run's {model_mpp:g} µm/px: the model cannot see its patches at the "
                        "resolution it was trained at.",
                        fix="Use a scan at 10x or finer (<= 0.97 µm/px); if the slide's mpp is "
                            "wrong, give the right one with --mpp.")
    level = choose_level(slide, factor)
    ds = slide.level_downsamples[level]
    scale = factor / ds
    if abs(scale - 1) <= MATCH_TOLERANCE:  # read the level as it is: the model sees
        scale, factor = 1.0, ds                # model_mpp * (1 +- 2 %), recorded below
    w0, h0 = slide.dimensions
    cell0 = stride * factor
    rows, cols = math.ceil(h0 / cell0), math.ceil(w0 / cell0)
    return SlideGrid(level=level, level_downsample=ds, factor=factor, scale=scale,
                     stride=stride, patch=patch, rows=rows, cols=cols, slide_mpp=slide.mpp,
                     model_mpp=slide.mpp * factor)
