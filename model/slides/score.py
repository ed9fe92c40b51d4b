"""A heatmap against the ground truth of a slide (the synthetic slide's, or any cell map).

Cell level, the label's own definition: a cell is positive when its 32x32 box holds a tumour
pixel. Over the cells the model ran on (tissue): AUC of the probabilities, Dice of the cells
at or above the threshold. Region level, the idea of Camelyon16's FROC: a tumour region is
found when one of its cells is at or above the threshold (sensitivity per size class), and a
false positive is a connected group of cells at or above the threshold that touches no
tumour region (grown by one cell: a hit just beside a region is not a false alarm).
"""
from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from model.slides.synthetic import SlideTruth


def score_heatmap(probs: np.ndarray, truth: SlideTruth, threshold: float) -> dict:
    if probs.shape != truth.cells.shape:
        raise ValueError(f"heatmap {probs.shape} and truth {truth.cells.shape} differ in shape")
    ran = np.isfinite(probs)
    y = truth.positive[ran]
    p = probs[ran]
    hot = np.nan_to_num(probs, nan=0.0) >= threshold
    pos = truth.positive
    dice = 2 * (hot & pos).sum() / max(hot.sum() + pos.sum(), 1)
    per_class: dict[str, list[int]] = {}
    regions = []
    for q in truth.regions:
        cells = truth.cells == q["id"]
        if not cells.any():
            continue  # placed but no tumour pixel painted (cannot happen for painted blocks)
        found = bool((hot & cells).any())
        regions.append({"id": q["id"], "class": q["class"], "diameter_mm": q["diameter_mm"],
                        "found": found, "max_prob": round(float(np.nanmax(
                            np.where(cells, probs, np.nan))), 4) if (cells & ran).any() else None})
        per_class.setdefault(q["class"], []).append(int(found))
    grown = cv2.dilate(pos.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    n, labels = cv2.connectedComponents(hot.astype(np.uint8), connectivity=8)
    false_pos = sum(1 for k in range(1, n) if not grown[labels == k].any())
    return {
        "threshold": threshold,
        "cell_auc": round(float(roc_auc_score(y, p)), 4) if 0 < y.sum() < y.size else None,
        "dice": round(float(dice), 4),
        "tumour_cells": int(pos.sum()), "cells_run": int(ran.sum()),
        "tumour_cells_not_run": int((pos & ~ran).sum()),
        "regions_found": sum(r["found"] for r in regions), "regions": len(regions),
        "sensitivity_by_class": {k: round(sum(v) / len(v), 3) for k, v in per_class.items()},
        "false_positives": int(false_pos),
        "per_region": regions,
    }
