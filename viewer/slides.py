"""Slides for the Slide page: open slides once per process, find finished heatmaps, draw the
overview and zoomed crops (model.slides does the reading and colouring), start heatmap jobs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from model.data.slides import Slide, open_slide
from model.review.log import ReviewLog, default_log_path
from model.slides.heatmap import SlideConfig
from model.slides.job import find_result
from model.slides.outputs import SlideResult, overlay, region_view
from model.slides.synthetic import DEFAULT_SIZE, synthetic_slide_path
from model.slides.tiles import read_block, tile_id
from viewer import jobs


@st.cache_resource(max_entries=8, show_spinner=False)
def slide(path: str, mpp: float | None) -> Slide:
    return open_slide(path, mpp=mpp)


def synthetic_path() -> Path:
    return synthetic_slide_path(DEFAULT_SIZE, 0)


def result(run_dir: Path, checkpoint: str, path: str, cfg: SlideConfig) -> SlideResult | None:
    return find_result(run_dir, checkpoint, path, cfg)


def job_key(run_dir: Path, path: str) -> str:
    return f"slide::{run_dir}::{path}"


def start_job(run_dir: Path, checkpoint: str, path: str | None, cfg: SlideConfig) -> None:
    args = [str(run_dir), "--checkpoint", checkpoint, "--tta", str(cfg.tta)]
    if path is not None:
        args += ["--slide", path]
    if cfg.mpp:
        args += ["--mpp", str(cfg.mpp)]
    jobs.start(job_key(run_dir, path or str(synthetic_path())), "model.slide", args,
               "Heatmap")


@st.cache_data(max_entries=16, show_spinner=False)
def overview(res_key: str, _res: SlideResult, alpha: float, threshold: float | None,
             outline: bool) -> np.ndarray:
    """The overlay over the thumbnail (cached per result key: a recomputed heatmap with other
    settings lands in the same folder under another key)."""
    thumb = _res.image("thumbnail")
    tissue = _res.image("tissue") > 0 if outline else None
    return overlay(thumb, _res.probs, _res.grid, _res.meta["thumbnail_downsample"], tissue,
                   alpha=alpha, threshold=threshold)


def crop(s: Slide, res: SlideResult, box0: tuple, alpha: float, threshold: float | None
         ) -> tuple[np.ndarray, tuple, float]:
    return region_view(s, res.probs, res.grid, box0, alpha=alpha, threshold=threshold)


def patch(s: Slide, res: SlideResult, r: int, c: int) -> tuple[np.ndarray, str]:
    """(the 96 px tile of cell (r, c) at the model's resolution, its review id)."""
    grid = res.grid
    return read_block(s, grid, r, c, 1, 1), tile_id(s, grid, r, c)


def review_log(path: str) -> ReviewLog:
    """Slide patches are reviewed into the log beside the slide (see model.review.log)."""
    return ReviewLog(default_log_path(Path(path)))
