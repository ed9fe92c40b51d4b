"""Scatter plots of every patch that stay fast at full Kaggle size (220,025 points).

Up to POINTS_MAX points are drawn as WebGL markers (plotly Scattergl). Above that, every point
is drawn into an image on the server (a few tens of milliseconds in numpy), shown under a
random sample of POINTS_MAX markers that carry hover and selection. Measured in headless
Chromium on 2 cores: plotly redraws all 220k markers on every mouse move of a box drag (about
0.9 s each, 20k: 0.15 s), so a drag took 8-11 s from mouse-up to the filled grid. The page
turns the box or lasso of a selection back into rows of all points
(model.evaluation.embeddings.rows_in_region), so the sample limits only what is hovered.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
from PIL import Image

POINTS_MAX = 20_000
IMAGE_PX = (1400, 900)  # the plot area is about 1,000 × 600 CSS px: twice for zoom / HiDPI
MISSING_RGB = (127, 127, 127)


def hex_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


VIRIDIS = np.array([pc.unlabel_rgb(c) for c in pc.sample_colorscale(
    "Viridis", list(np.linspace(0, 1, 256)))]).round().astype(np.uint8)


def viridis_rgb(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[n, 3] uint8 Viridis colours of `values` scaled to [lo, hi]; NaN grey."""
    lut = VIRIDIS
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    out = lut[np.nan_to_num(t * 255).astype(int)]
    out[np.isnan(values)] = MISSING_RGB
    return out


def bounds(xy: np.ndarray, pad: float = 0.03) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of the points with a margin, so that edge markers are not cut."""
    x0, y0 = np.nanmin(xy, axis=0)
    x1, y1 = np.nanmax(xy, axis=0)
    dx, dy = max(x1 - x0, 1e-6) * pad, max(y1 - y0, 1e-6) * pad
    return float(x0 - dx), float(x1 + dx), float(y0 - dy), float(y1 + dy)


def raster(xy: np.ndarray, rgb: np.ndarray, box: tuple[float, float, float, float],
           size: tuple[int, int] = IMAGE_PX) -> Image.Image:
    """Every point as a 3×3 px dot of its colour (colours of one pixel averaged, opacity
    rising with the number of points there) on a transparent RGBA image covering `box`."""
    w, h = size
    x0, x1, y0, y1 = box
    col = np.clip(((xy[:, 0] - x0) / (x1 - x0) * (w - 1)).round(), 0, w - 1).astype(np.int64)
    row = np.clip(((y1 - xy[:, 1]) / (y1 - y0) * (h - 1)).round(), 0, h - 1).astype(np.int64)
    ok = np.isfinite(xy).all(axis=1)
    pix = (row * w + col)[ok]
    count = np.bincount(pix, minlength=w * h).astype(np.float32)
    sums = np.stack([np.bincount(pix, weights=rgb[ok, k], minlength=w * h)
                     for k in range(3)], axis=1).astype(np.float32)
    count, sums = _dilate(count.reshape(h, w)), _dilate(sums.reshape(h, w, 3))
    has = count > 0
    colour = np.zeros((h, w, 4), np.uint8)
    colour[..., :3][has] = (sums[has] / count[has, None]).round().astype(np.uint8)
    # one point is clearly visible, a dense cluster opaque
    alpha = 0.55 + 0.45 * np.log1p(count) / np.log1p(max(float(count.max()), 1.0))
    colour[..., 3] = np.where(has, alpha * 255, 0).astype(np.uint8)
    return Image.fromarray(colour, "RGBA")


def _dilate(a: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3×3 neighbourhood: a point covers 3×3 px, as a size-3 marker."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2))
    h, w = a.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3))


def sample_rows(groups: pd.Series | None, n: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a random sample of at most POINTS_MAX of n points; a small group (under
    a tenth of the sample, e.g. the errors) is kept whole so that it can be hovered."""
    rng = np.random.default_rng(seed)
    if n <= POINTS_MAX:
        return np.arange(n)
    if groups is None:
        return np.sort(rng.choice(n, POINTS_MAX, replace=False))
    codes = pd.factorize(groups)[0]
    sizes = np.bincount(codes)
    small = sizes < POINTS_MAX // 10
    keep = np.flatnonzero(small[codes])
    rest = np.flatnonzero(~small[codes])
    room = max(POINTS_MAX - len(keep), 0)
    if len(rest) > room:
        rest = rng.choice(rest, room, replace=False)
    return np.sort(np.concatenate([keep, rest]))


def image_layer(fig: go.Figure, img: Image.Image, box: tuple[float, float, float, float],
                y_down: bool = False) -> None:
    """Put `img` under the traces, stretched over `box` (x0, x1, y0, y1) in data coordinates,
    and fix the axes to the box so that image and markers stay aligned. `y_down`: image rows
    run with y (a slide's pixel coordinates), else against it (a map)."""
    x0, x1, y0, y1 = box
    fig.add_layout_image(source=img, xref="x", yref="y", x=x0, y=y0 if y_down else y1,
                         sizex=x1 - x0, sizey=y1 - y0, sizing="stretch", layer="below")
    fig.update_xaxes(range=[x0, x1], autorange=False)
    fig.update_yaxes(range=[y1, y0] if y_down else [y0, y1], autorange=False)
