"""Tissue detection on a slide thumbnail: Otsu on saturation, specks and small holes removed.

Glass is bright and grey (low saturation), stained tissue is pink to purple, so a threshold
on the HSV saturation separates them on any H&E scan; Otsu chooses it per slide, with a floor
so that an empty slide (glass noise only) finds no tissue rather than its noise. Dark
pixels (pen marks, slide edges, dust) are not tissue. Objects smaller than `min_object_mm2`
go (dust, debris), holes smaller than `max_hole_mm2` are filled (nuclei-free lumen inside
tissue is still tissue; a big hole, e.g. fat or a tear, stays out).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.slides.geometry import SlideGrid

MIN_SATURATION = 20  # of 255: below this even Otsu's threshold is glass noise
MAX_DARK = 40  # value (HSV) below this is ink, a slide edge or dust, not stained tissue
MIN_OBJECT_MM2 = 0.01
MAX_HOLE_MM2 = 0.05


@dataclass
class TissueMask:
    mask: np.ndarray  # bool [h, w] at the thumbnail's resolution
    downsample: float  # thumbnail px = downsample level-0 px
    threshold: int  # the saturation threshold used (0..255)

    def cell_fraction(self, grid: SlideGrid) -> np.ndarray:
        """float32 [rows, cols]: the tissue share of each heatmap cell."""
        cell = grid.cell0 / self.downsample  # cell side in mask px
        h, w = self.mask.shape
        ph, pw = max(round(grid.rows * cell), h), max(round(grid.cols * cell), w)
        padded = np.zeros((ph, pw), np.float32)
        padded[:h, :w] = self.mask
        return cv2.resize(padded, (grid.cols, grid.rows), interpolation=cv2.INTER_AREA)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # the background label
    return keep[labels]


def detect_tissue(thumb: np.ndarray, downsample: float, mpp: float, *,
                  min_object_mm2: float = MIN_OBJECT_MM2, max_hole_mm2: float = MAX_HOLE_MM2
                  ) -> TissueMask:
    """Tissue mask of an RGB thumbnail whose pixel is `downsample` level-0 px of `mpp` µm."""
    hsv = cv2.cvtColor(np.ascontiguousarray(thumb[..., :3]), cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(max(otsu, MIN_SATURATION))
    mask = (sat > threshold) & (val > MAX_DARK)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE,
                            np.ones((3, 3), np.uint8)).astype(bool)
    px_mm2 = (downsample * mpp / 1000) ** 2
    mask = _drop_small(mask, min_object_mm2 / px_mm2)
    holes = _drop_small(~mask, max_hole_mm2 / px_mm2 + 1)  # holes this big stay
    # a "hole" touching the border is the glass around the tissue: never filled
    mask = mask | ~(holes | _touches_border(~mask))
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def _touches_border(background: np.ndarray) -> np.ndarray:
    n, labels = cv2.connectedComponents(background.astype(np.uint8), connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = np.isin(labels, edge[edge > 0])
    return border
