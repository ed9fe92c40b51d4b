"""A slide heatmap on disk: one folder per (run, slide), written at once, read back whole.

    <out>/heatmap.npy        float32 [rows, cols] P(tumour) per cell, NaN outside tissue
    <out>/heatmap.json       geometry (level, downsample, resampling factor, cell size in
                             level-0 px, origin), slide, run, settings, the reuse key
    <out>/tissue.png         the tissue mask (thumbnail resolution, 255 = tissue)
    <out>/thumbnail.png      the slide thumbnail the mask and overlay are drawn on
    <out>/overlay.png        heatmap over the thumbnail, tissue outlined
    <out>/regions.geojson    polygons of the cells at or above the threshold, level-0 px
                             (QuPath: File > Import objects)
    <out>/summary.json       tissue and tumour area (mm²), slide score, tiles, seconds

The folder is staged and renamed into place (core.atomic.atomic_dir): a killed job leaves
nothing under <out>, and a rerun with the same slide, run and settings finds the finished
result by its key and reuses it.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model.core.atomic import atomic_dir, atomic_open, write_bytes, write_json
from model.data.slides import Slide
from model.slides.geometry import SlideGrid
from model.slides.heatmap import SlideHeatmap

FORMAT = 1
OUTLINE_RGB = (0, 110, 255)
CONTOUR_UPSAMPLE = 4  # polygons traced on a 4x finer grid follow the cell edges closely


@dataclass
class SlideResult:
    """A finished heatmap read back from its folder."""

    dir: Path
    probs: np.ndarray
    meta: dict  # heatmap.json
    summary: dict

    @property
    def grid(self) -> SlideGrid:
        g = self.meta["grid"]
        return SlideGrid(**{k: g[k] for k in SlideGrid.__dataclass_fields__})

    def image(self, name: str) -> np.ndarray:
        with Image.open(self.dir / f"{name}.png") as im:
            return np.asarray(im.convert("RGB" if name != "tissue" else "L"))


def result_key(slide: Slide, run_meta: dict, settings: dict) -> str:
    """What a finished result must match to be reused: the slide file (path, size, mtime),
    the run's weights and the settings."""
    st = slide.path.stat()
    blob = json.dumps({"slide": [str(slide.path.resolve()), st.st_size, st.st_mtime_ns,
                                 slide.mpp], "run": run_meta, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_result(out: Path) -> SlideResult | None:
    """The finished result in `out`, or None (missing, another format, unreadable)."""
    try:
        meta = json.loads((out / "heatmap.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        probs = np.load(out / "heatmap.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    g = meta.get("grid", {})
    if meta.get("format") != FORMAT or probs.shape != (g.get("rows"), g.get("cols")):
        return None
    return SlideResult(dir=out, probs=probs, meta=meta, summary=summary)


def colour_cells(probs: np.ndarray, shape: tuple[int, int], alpha: float = 0.5,
                 threshold: float | None = None) -> np.ndarray:
    """RGBA uint8 [h, w, 4]: the cells upsampled to `shape`, coloured (turbo: blue 0 to red
    1; opacity `alpha` at p = 1, 0.3 alpha at p = 0), transparent where NaN or below
    `threshold`."""
    h, w = shape
    big = cv2.resize(np.nan_to_num(probs, nan=-1.0), (w, h), interpolation=cv2.INTER_NEAREST)
    rgb = cv2.applyColorMap((np.clip(big, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    # opacity rises with the probability: tissue the model calls benign stays visible
    a = alpha * (0.3 + 0.7 * np.clip(big, 0, 1)) * 255
    out = np.dstack([rgb[..., ::-1], a.astype(np.uint8)])
    hide = big < 0 if threshold is None else big < threshold
    out[hide, 3] = 0
    return out


def _blend(rgb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255
    return (rgb[..., :3] * (1 - a) + rgba[..., :3] * a).astype(np.uint8)


def overlay(thumb: np.ndarray, probs: np.ndarray, grid: SlideGrid, downsample: float,
            tissue: np.ndarray | None = None, alpha: float = 0.5,
            threshold: float | None = None) -> np.ndarray:
    """RGB thumbnail with the heatmap blended in and the tissue outlined."""
    h, w = thumb.shape[:2]
    # the cell grid covers rows x cols cells, a little more than the slide: crop to it
    gh, gw = round(grid.rows * grid.cell0 / downsample), round(grid.cols * grid.cell0 / downsample)
    layer = colour_cells(probs, (max(gh, h), max(gw, w)), alpha, threshold)[:h, :w]
    out = _blend(thumb, layer)
    if tissue is not None:
        contours, _ = cv2.findContours(tissue.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, OUTLINE_RGB, max(1, round(max(h, w) / 800)))
    return out


def regions_geojson(probs: np.ndarray, grid: SlideGrid, threshold: float,
                    slide_name: str = "") -> dict:
    """GeoJSON FeatureCollection: one Polygon (with holes) per connected region of cells at
    or above `threshold`, in level-0 pixel coordinates, as QuPath imports annotations."""
    hot = np.nan_to_num(probs, nan=0.0) >= threshold
    k = CONTOUR_UPSAMPLE
    big = np.kron(hot.astype(np.uint8), np.ones((k, k), np.uint8))
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features = []
    if hierarchy is None:
        return {"type": "FeatureCollection", "features": features}
    hierarchy = hierarchy[0]
    s = grid.cell0 / k
    w0, h0 = grid.cols * grid.cell0, grid.rows * grid.cell0

    def ring(cnt) -> list[list[float]]:
        pts = cnt.reshape(-1, 2).astype(np.float64)
        xy = np.column_stack([np.clip((pts[:, 0] + 0.5) * s, 0, w0),
                              np.clip((pts[:, 1] + 0.5) * s, 0, h0)]).round(1).tolist()
        return xy + [xy[0]]

    for i, cnt in enumerate(contours):
        if hierarchy[i][3] >= 0 or len(cnt) < 3:  # a hole: added to its parent below
            continue
        rings = [ring(cnt)]
        child = hierarchy[i][2]
        while child >= 0:
            if len(contours[child]) >= 3:
                rings.append(ring(contours[child]))
            child = hierarchy[child][0]
        region = np.zeros_like(big)
        cv2.drawContours(region, [cnt], -1, 1, -1)
        cells = region[::k, ::k].astype(bool) & hot
        p = probs[cells]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation", "name": f"{slide_name} tumour p>={threshold:g}",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "isLocked": False,
                "measurements": {"cells": int(cells.sum()),
                                 "area_mm2": round(float(cells.sum() * grid.cell_area_mm2), 5),
                                 "max_prob": round(float(np.nanmax(p)), 5) if p.size else None,
                                 "mean_prob": round(float(np.nanmean(p)), 5) if p.size else None},
            }})
    return {"type": "FeatureCollection", "features": features}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_result(out: Path, hm: SlideHeatmap, slide: Slide, summary: dict, meta: dict,
                 threshold: float) -> SlideResult:
    """Write every output of `hm` into `out` at once (see the module docstring)."""
    meta = {"format": FORMAT, **meta, "slide": slide.describe(), "grid": hm.grid.to_json(),
            "thumbnail_downsample": hm.thumb_downsample,
            "tissue_threshold": hm.tissue.threshold, "tiles": hm.tiles}
    with atomic_dir(out) as tmp:
        with atomic_open(tmp / "heatmap.npy", "wb", fsync=False) as f:
            np.lib.format.write_array(f, hm.probs, allow_pickle=False)
        write_bytes(tmp / "tissue.png", _png(hm.tissue.mask.astype(np.uint8) * 255), fsync=False)
        write_bytes(tmp / "thumbnail.png", _png(hm.thumb[..., :3]), fsync=False)
        write_bytes(tmp / "overlay.png", _png(overlay(hm.thumb, hm.probs, hm.grid,
                                                      hm.thumb_downsample, hm.tissue.mask)),
                    fsync=False)
        geo = regions_geojson(hm.probs, hm.grid, threshold, slide.name)
        write_json(tmp / "regions.geojson", geo, fsync=False)
        summary = {**summary, "regions": len(geo["features"])}
        write_json(tmp / "heatmap.json", meta, fsync=False)
        write_json(tmp / "summary.json", summary, fsync=False)
    return SlideResult(dir=out, probs=hm.probs, meta=meta, summary=summary)


def region_view(slide: Slide, probs: np.ndarray, grid: SlideGrid,
                box0: tuple[float, float, float, float], max_px: int = 1400,
                alpha: float = 0.4, threshold: float | None = None
                ) -> tuple[np.ndarray, tuple[int, int, int, int], float]:
    """A crop of the slide with the heatmap over it, read from the coarsest pyramid level
    that still shows the crop at `max_px` (so that any zoom reads about max_px² pixels):
    (RGB, the crop's level-0 box (x0, y0, x1, y1), level-0 px per output px)."""
    w0, h0 = slide.dimensions
    x0, y0 = max(int(box0[0]), 0), max(int(box0[1]), 0)
    x1, y1 = min(int(np.ceil(box0[2])), w0), min(int(np.ceil(box0[3])), h0)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty region {box0}")
    want = max(x1 - x0, y1 - y0) / max_px  # level-0 px per output px
    level = max((k for k, d in enumerate(slide.level_downsamples) if d <= max(want, 1)),
                default=0)
    ds = slide.level_downsamples[level]
    rw, rh = max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds))
    rgb = slide.read(level, x0, y0, rw, rh)
    scale = max(want, 1.0)
    ow, oh = max(1, round((x1 - x0) / scale)), max(1, round((y1 - y0) / scale))
    if (ow, oh) != (rw, rh):
        rgb = cv2.resize(rgb, (ow, oh), interpolation=cv2.INTER_AREA)
    # the cells over the crop, upsampled to its pixels
    c0, r0 = int(x0 // grid.cell0), int(y0 // grid.cell0)
    c1 = min(int(np.ceil(x1 / grid.cell0)), grid.cols)
    r1 = min(int(np.ceil(y1 / grid.cell0)), grid.rows)
    part = probs[r0:r1, c0:c1]
    cw = round((c1 - c0) * grid.cell0 / scale)
    ch = round((r1 - r0) * grid.cell0 / scale)
    layer = colour_cells(part, (max(ch, 1), max(cw, 1)), alpha, threshold)
    ox, oy = round((x0 - c0 * grid.cell0) / scale), round((y0 - r0 * grid.cell0) / scale)
    layer = layer[oy:oy + oh, ox:ox + ow]
    pad = np.zeros((oh, ow, 4), np.uint8)
    pad[:layer.shape[0], :layer.shape[1]] = layer
    return _blend(rgb, pad), (x0, y0, x1, y1), scale
