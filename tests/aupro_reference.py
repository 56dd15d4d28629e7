"""Slow, straightforward AUPRO implementations written from the definitions (the official code's PRO steps).

Used only by the tests to check the vectorised ``msflow.metrics.aupro``.  Explicit loops
over thresholds, images and regions; no sorting tricks.
"""

from __future__ import annotations

import numpy as np
from skimage import measure
from sklearn.metrics import auc


def _regions(masks: list[np.ndarray]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(image index, rows, cols) of every 8-connected GT region of every image."""
    out = []
    for i, mask in enumerate(masks):
        for region in measure.regionprops(measure.label(mask != 0, connectivity=2)):
            out.append((i, region.coords[:, 0], region.coords[:, 1]))
    return out


def _pro_and_fpr(masks: list[np.ndarray], maps: list[np.ndarray], regions, predict) -> tuple[float, float]:
    """PRO and FPR for one binarisation rule ``predict(map) -> bool array``."""
    preds = [predict(amap) for amap in maps]
    overlaps = [preds[i][rows, cols].sum() / rows.size for i, rows, cols in regions]
    false_pos = sum(np.logical_and(pred, mask == 0).sum() for pred, mask in zip(preds, masks, strict=False))
    negatives = sum((mask == 0).sum() for mask in masks)
    return float(np.mean(overlaps)), float(false_pos / negatives)


def aupro_standard_reference(masks, maps, fpr_limit: float = 0.3) -> float:
    """Standard AUPRO in percent: every distinct score is a threshold, pred = score >= θ."""
    masks = [np.asarray(m) for m in masks]
    maps = [np.asarray(a, dtype=np.float64) for a in maps]
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]  # high to low
    regions = _regions(masks)
    points = [(0.0, 0.0)]  # θ above every score: nothing predicted
    for theta in thresholds:
        pro, fpr = _pro_and_fpr(masks, maps, regions, lambda a, theta=theta: a >= theta)
        points.append((fpr, pro))
    # Integrate the piecewise linear curve segment by segment, clipping at fpr_limit.
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=False):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # partial last segment: interpolate PRO at fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / fpr_limit * 100.0


def aupro_official_reference(masks, maps, max_step: int = 800, expect_fpr: float = 0.3) -> float:
    """Official MSFlow PRO in percent, step by step as the official evaluation does it (stacked arrays)."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    max_th, min_th = maps.max(), maps.min()
    delta = (max_th - min_th) / max_step
    thresholds = np.arange(min_th, max_th, delta)  # step 1
    regions = _regions(list(masks))
    pros, fprs = [], []
    for theta in thresholds:  # steps 2-4
        pro, fpr = _pro_and_fpr(list(masks), list(maps), regions, lambda a, theta=theta: a > theta)
        pros.append(pro)
        fprs.append(fpr)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr  # step 5
    fprs_kept = fprs[keep]
    fprs_kept = (fprs_kept - fprs_kept.min()) / (fprs_kept.max() - fprs_kept.min())  # step 6
    return float(auc(fprs_kept, pros[keep]) * 100.0)  # step 7
