"""A synthetic whole slide with ground truth: the demo for `model.slide` on a fresh machine and
the truth its tests measure against.

    path, truth = synthetic_slide(size=8192, seed=0)      # cached: made once per (size, seed)
    truth.cells        # int16 [rows, cols]: region id whose tumour pixels the 32x32 cell holds

The slide is 10x (0.972 µm/px, the model's own resolution) with glass around an irregular
piece of tissue (a noisy ellipse with soft edges and a detached fragment). The tissue is a
mosaic of 96 px blocks painted by the built-in patch generator (model.data.synthetic: stroma,
lymphocytes and lymphoid aggregates, stain varying block to block the way it varies between
PCam patches). Blocks whose centre lies in a tumour region are painted from the generator's
positive patches (a tumour cell cluster over the centre), the rest from its clear patches, so
every tumour pixel is known exactly: the generator's own mask. Tumour regions have the sizes
Camelyon16 distinguishes: macro-metastases (> 2 mm), micro-metastases (0.2-2 mm) and isolated
tumour cells (< 0.2 mm).

It is written as a tiled pyramidal TIFF (JPEG tiles, 256 px, levels 1/2/4/8, resolution tags
in centimetres) that OpenSlide opens as a generic tiled TIFF with its mpp, plus the truth:
`<name>.truth.npy` (cell map) and `<name>.truth.json` (regions: centre, diameter, class).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from model.core.atomic import atomic_open, atomic_path, write_json
from model.core.errors import DataError
from model.core.paths import cache_base
from model.data.base import CENTRE
from model.data.synthetic import paint_field, slide_stain
from model.slides.geometry import PCAM_MPP

VERSION = 2  # of the painter: a cached slide of another version is not reused
DEFAULT_SIZE = 8192  # 8 mm square at 10x: about 30,000 tissue tiles
TILE = 256
STRIP = 768  # rows painted at once, in square fields of this side (a multiple of TILE)
LEVELS = (1, 2, 4, 8)
GLASS_RGB = np.array([243, 241, 245], np.float32)
SLIDE_SEED_OFFSET = 1000  # the slide's patches come from sets no training run uses
# (diameter in mm, Camelyon16 class) of the tumour regions, largest first
REGIONS_MM = ((2.4, "macro"), (1.2, "micro"), (0.7, "micro"), (0.45, "micro"), (0.3, "micro"),
              (0.15, "itc"))


@dataclass
class SlideTruth:
    cells: np.ndarray  # int16 [rows, cols]: region id (1..) of the tumour pixels in the cell
    regions: list[dict]  # id, centre_px, diameter_mm, class

    @property
    def positive(self) -> np.ndarray:
        return self.cells > 0


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _tissue_field(rng: np.random.Generator, size: int, low: int) -> np.ndarray:
    """float32 [low, low]: > 0 inside tissue (a noisy ellipse and a small fragment)."""
    yy, xx = (np.mgrid[0:low, 0:low].astype(np.float32) + 0.5) / low
    main = 1 - np.hypot((xx - 0.47) / 0.40, (yy - 0.5) / 0.44) + 0.16 * _noise(rng, (low, low), 6)
    frag = 0.4 - np.hypot((xx - 0.88) / 0.07, (yy - 0.18) / 0.09) * 0.4
    return np.maximum(main, frag) + 0.04 * _noise(rng, (low, low), 24)


def _place_regions(rng: np.random.Generator, field: np.ndarray, size: int, mpp: float
                   ) -> list[dict]:
    """Tumour discs inside the tissue, apart from each other."""
    low = field.shape[0]
    regions: list[dict] = []
    for k, (mm, kind) in enumerate(REGIONS_MM, start=1):
        r_px = mm * 1000 / mpp / 2
        if 2 * (r_px + 200) > 0.6 * size:
            continue  # a small slide holds only the smaller regions
        for _ in range(500):
            c = rng.uniform(r_px + 200, size - r_px - 200, 2)
            fy, fx = (c[::-1] / size * low).astype(int)
            if field[fy, fx] < 0.35:
                continue  # not deep enough inside the tissue
            if all(np.hypot(*(c - q["centre_px"])) > r_px + q["radius_px"] + 300
                   for q in regions):
                regions.append({"id": k, "centre_px": c.round(1).tolist(),
                                "radius_px": round(r_px, 1), "diameter_mm": mm, "class": kind})
                break
    return regions


def _wobble(q: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A region's radius factor by direction: irregular, not a disc."""
    a = np.arctan2(y - q["centre_px"][1], x - q["centre_px"][0])
    return 1 + 0.18 * (np.sin(3 * a + q["id"]) * 0.6 + np.sin(5 * a + 2 * q["id"]) * 0.4)


def _region_of(regions: list[dict], x: np.ndarray, y: np.ndarray, grow: float = 0.0
               ) -> np.ndarray:
    """int16 region id (0 = none) at the points (x, y), each region grown by `grow` px."""
    out = np.zeros(np.shape(x), np.int16)
    for q in regions:
        d = np.hypot(x - q["centre_px"][0], y - q["centre_px"][1])
        out[(out == 0) & (d <= q["radius_px"] * _wobble(q, x, y) + grow)] = q["id"]
    return out


def _paint_strip(y0: int, size: int, seed: int, field: np.ndarray, regions: list[dict],
                 stain: tuple, cells: np.ndarray) -> np.ndarray:
    """uint8 [STRIP, size, 3] of slide rows [y0, y0 + STRIP), painted in STRIP-px fields;
    fills `cells` (truth) with the region id of every cell holding a tumour pixel."""
    low = field.shape[0]
    h = min(STRIP, size - y0)
    # the tissue's soft edge at pixel resolution
    ys = (np.arange(y0, y0 + h) + 0.5) / size * low - 0.5
    xs = (np.arange(size) + 0.5) / size * low - 0.5
    mx, my = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    alpha = cv2.remap(field, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = np.clip(alpha / 0.03, 0, 1)[..., None]
    strip = np.broadcast_to(GLASS_RGB, (h, size, 3)).copy()
    strip += np.random.default_rng([seed, y0]).normal(0, 2.0, (h, size, 1)).astype(np.float32)
    for x0 in range(0, size, STRIP):
        w = min(STRIP, size - x0)
        a = alpha[:, x0:x0 + w]
        if a.max() == 0:
            continue
        rng = np.random.default_rng([seed, y0, x0])
        # tumour: clusters on a jittered 30 px grid inside the regions (a solid metastasis)
        g = np.arange(15.0, STRIP, 30.0)
        gx, gy = [v.ravel() for v in np.meshgrid(g, g)]
        gx, gy = gx + rng.uniform(-6, 6, gx.size), gy + rng.uniform(-6, 6, gy.size)
        inside = _region_of(regions, gx + x0, gy + y0) > 0
        rgb, mask = paint_field(rng, STRIP, np.column_stack([gx, gy])[inside], stain)
        part = rgb[:h, :w].astype(np.float32)
        strip[:, x0:x0 + w] = part * a + strip[:, x0:x0 + w] * (1 - a)
        tum = mask[:h, :w] & (a[..., 0] > 0.5)
        if tum.any():
            ch, cw = -(-h // CENTRE), -(-w // CENTRE)
            pad = np.zeros((ch * CENTRE, cw * CENTRE), bool)
            pad[:h, :w] = tum
            hit = pad.reshape(ch, CENTRE, cw, CENTRE).any(axis=(1, 3))
            r, c = np.nonzero(hit)
            cx, cy = (c + 0.5) * CENTRE + x0, (r + 0.5) * CENTRE + y0
            cells[y0 // CENTRE + r, x0 // CENTRE + c] = _region_of(regions, cx, cy, grow=60)
    return np.clip(strip, 0, 255).astype(np.uint8)


def _tiles(img: np.ndarray) -> list[np.ndarray]:
    h, w = img.shape[:2]
    out = []
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            t = np.full((TILE, TILE, 3), 255, np.uint8)
            part = img[y:y + TILE, x:x + TILE]
            t[:part.shape[0], :part.shape[1]] = part
            out.append(t)
    return out


def write_synthetic_slide(path: Path, size: int = DEFAULT_SIZE, seed: int = 0,
                          log=None) -> SlideTruth:
    """Paint the slide strip by strip (memory: one strip plus the reduced levels), write the
    pyramidal TIFF and its truth next to it, each atomically."""
    if not isinstance(size, int) or size < 2048:
        raise DataError(f"A synthetic slide needs at least 2048 px a side; got {size!r}.",
                        fix="Use e.g. --synthetic-size 8192.")
    rng = np.random.default_rng([seed, 7])
    low = max(256, size // 16)
    field = _tissue_field(rng, size, low)
    regions = _place_regions(rng, field, size, PCAM_MPP)
    stain = slide_stain(rng)
    cells = np.zeros((-(-size // CENTRE), -(-size // CENTRE)), np.int16)
    reduced = {f: np.zeros((-(-size // f), -(-size // f), 3), np.uint8) for f in LEVELS[1:]}
    res = (1e4 / PCAM_MPP, 1e4 / PCAM_MPP)  # pixels per centimetre

    def level0_tiles():
        for y0 in range(0, size, STRIP):
            strip = _paint_strip(y0, size, SLIDE_SEED_OFFSET + seed, field, regions, stain, cells)
            for f, arr in reduced.items():
                small = cv2.resize(strip, (-(-size // f), -(-strip.shape[0] // f)),
                                   interpolation=cv2.INTER_AREA)
                arr[y0 // f:y0 // f + small.shape[0]] = small
            if log:
                log(f"painted rows {y0 + strip.shape[0]:,} of {size:,}")
            # tiles of this strip, row by row (the strip holds whole tile rows)
            yield from _tiles(strip)

    kw = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg",
              compressionargs={"level": 90}, resolution=res, resolutionunit="CENTIMETER")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=size > 30000) as tif:
        tif.write(level0_tiles(), shape=(size, size, 3), dtype=np.uint8,
                  description=f"pcam-lens synthetic slide seed={seed} mpp={PCAM_MPP}", **kw)
        for factor, arr in reduced.items():
            tif.write(arr, subfiletype=1, **{**kw, "resolution": (res[0] / factor,
                                                                  res[1] / factor)})
    truth = SlideTruth(cells=cells, regions=regions)
    with atomic_open(truth_paths(path)[0], "wb") as f:
        np.lib.format.write_array(f, cells, allow_pickle=False)
    write_json(truth_paths(path)[1], {"size": size, "seed": seed, "mpp": PCAM_MPP,
                                      "cell_px": CENTRE, "regions": truth.regions})
    return truth


def truth_paths(path: Path) -> tuple[Path, Path]:
    return path.with_suffix(".truth.npy"), path.with_suffix(".truth.json")


def read_truth(path: Path) -> SlideTruth | None:
    """The ground truth beside a synthetic slide, or None (a real slide)."""
    npy, js = truth_paths(Path(path))
    try:
        cells = np.load(npy, allow_pickle=False)
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    return SlideTruth(cells=cells, regions=meta["regions"])


def synthetic_slide_path(size: int = DEFAULT_SIZE, seed: int = 0, folder: Path | None = None
                         ) -> Path:
    folder = Path(folder) if folder is not None else cache_base() / "slides"
    return folder / f"synthetic-v{VERSION}-{size}-seed{seed}.tiff"


def synthetic_slide(size: int = DEFAULT_SIZE, seed: int = 0, folder: Path | None = None,
                    log=None) -> tuple[Path, SlideTruth]:
    """The cached synthetic slide of (size, seed), made on first use."""
    path = synthetic_slide_path(size, seed, folder)
    truth = read_truth(path) if path.exists() else None
    if truth is None:
        truth = write_synthetic_slide(path, size, seed, log=log)
    return path, truth
