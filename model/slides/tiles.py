"""Tiles of a slide for the model: read in large blocks, resampled once, cut in memory.

One `read_region` per block of BLOCK_CELLS x BLOCK_CELLS cells (plus the context rim), not per
tile: with the default stride every pixel is in nine tiles, and a per-tile read decodes each
one nine times. The block is shrunk to the model's resolution in one cv2.resize, the tiles are
views into it. A reader thread keeps up to PREFETCH batches ready while the model runs
(OpenSlide's decoding and cv2 release the GIL), so memory is bounded by one block plus the
queued batches, whatever the slide's size.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from model.data.slides import Slide
from model.slides.geometry import SlideGrid

BLOCK_CELLS = 32
PREFETCH = 4


@dataclass
class ReadStats:
    """Seconds the reader spent reading + resampling, and the model's wait for it."""

    read_s: float = 0.0
    wait_s: float = 0.0
    blocks: int = 0
    reads: list = field(default_factory=list, repr=False)


def tile_order(cells: np.ndarray, block: int = BLOCK_CELLS) -> np.ndarray:
    """[n, 2] (row, col) of `cells` in the order the tiles are produced: blocks row by row,
    cells row by row inside a block."""
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    key = np.lexsort((cells[:, 1], cells[:, 0], cells[:, 1] // block, cells[:, 0] // block))
    return cells[key]


def read_block(slide: Slide, grid: SlideGrid, r0: int, c0: int, nr: int, nc: int
               ) -> np.ndarray:
    """uint8 [nr*stride + 2*rim, nc*stride + 2*rim, 3] at model resolution: the cells
    [r0, r0+nr) x [c0, c0+nc) with their context rim."""
    s, rim = grid.stride, grid.rim
    h_m, w_m = (nr - 1) * s + grid.patch, (nc - 1) * s + grid.patch
    x0 = round((c0 * s - rim) * grid.factor)
    y0 = round((r0 * s - rim) * grid.factor)
    if grid.scale == 1.0:
        return slide.read(grid.level, x0, y0, w_m, h_m)
    w_l, h_l = round(w_m * grid.scale), round(h_m * grid.scale)
    region = slide.read(grid.level, x0, y0, w_l, h_l)
    return cv2.resize(region, (w_m, h_m), interpolation=cv2.INTER_AREA)


def _blocks(order: np.ndarray, block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(block row, block col, the block's cells) in production order."""
    keys = order // block
    change = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    for part in np.split(order, change):
        yield int(part[0, 0] // block), int(part[0, 1] // block), part


def _produce(slide: Slide, grid: SlideGrid, order: np.ndarray, batch_size: int, block: int,
             out: queue.Queue, stop: threading.Event, stats: ReadStats) -> None:
    """Reader thread: fill `out` with uint8 batches in `order`, then None (or an error)."""
    try:
        buf = np.empty((batch_size, grid.patch, grid.patch, 3), np.uint8)
        k = 0
        for br, bc, part in _blocks(order, block):
            t0 = time.perf_counter()
            r0, c0 = br * block, bc * block
            nr = min(block, grid.rows - r0)
            nc = min(block, grid.cols - c0)
            img = read_block(slide, grid, r0, c0, nr, nc)
            stats.read_s += time.perf_counter() - t0
            stats.blocks += 1
            for r, c in part:
                y, x = (r - r0) * grid.stride, (c - c0) * grid.stride
                buf[k] = img[y:y + grid.patch, x:x + grid.patch]
                k += 1
                if k == batch_size:
                    if not _put(out, buf.copy(), stop):
                        return
                    k = 0
        if k and not _put(out, buf[:k].copy(), stop):
            return
        _put(out, None, stop)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
        _put(out, e, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def iter_tiles(slide: Slide, grid: SlideGrid, order: np.ndarray, batch_size: int = 256, *,
               block: int = BLOCK_CELLS, stats: ReadStats | None = None
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, uint8 [B, patch, patch, 3]) batches of the tiles of `order` (see tile_order),
    read ahead by a thread. Closing the iterator early stops the thread."""
    stats = stats if stats is not None else ReadStats()
    out: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, name="slide-reader", daemon=True,
                              args=(slide, grid, order, batch_size, block, out, stop, stats))
    worker.start()
    start = 0
    try:
        while True:
            t0 = time.perf_counter()
            item = out.get()
            stats.wait_s += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield start, torch.from_numpy(item)
            start += len(item)
    finally:
        stop.set()
        worker.join(timeout=5)


def naive_tiles(slide: Slide, grid: SlideGrid, order: np.ndarray
                ) -> Iterator[np.ndarray]:
    """One read_region (and resample) per tile: the loop the block reader replaces, kept for
    `model.bench --slide` to compare against."""
    for r, c in order:
        yield read_block(slide, grid, int(r), int(c), 1, 1)


def tile_id(slide: Slide, grid: SlideGrid, r: int, c: int) -> str:
    """A slide patch's id for the review log: slide file, level read, level-0 top left and
    side of the 96 px tile (`read_tile_id` reads it back)."""
    x0 = round((c * grid.stride - grid.rim) * grid.factor)
    y0 = round((r * grid.stride - grid.rim) * grid.factor)
    return f"{slide.path.name}:L{grid.level}:x{x0}:y{y0}:w{round(grid.patch * grid.factor)}"
