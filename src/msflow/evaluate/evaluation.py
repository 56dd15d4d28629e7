"""Evaluate a stream of predictions on a labelled test set: metrics and the report, in bounded memory.

Each image's maps are consumed as they arrive: its ground truth is read, the streaming metrics are
updated, its CSV row is written (and flushed) and, for a fixed sample of images, an overlay is drawn;
then the maps are dropped. Memory is one image's maps plus the fixed-size accumulators of
:mod:`msflow.evaluate.streaming`, whatever the number of test images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from msflow.data.datasets import Sample
from msflow.data.images import read_image, read_mask, to_uint8
from msflow.errors import DataError
from msflow.evaluate import report
from msflow.evaluate.streaming import DEFAULT_BINS, StreamingMetrics
from msflow.evaluate.threshold import Threshold
from msflow.files import atomic_write_bytes

NUM_OVERLAYS = 16
CSV_FIELDS = ["image", "label", "defect_type", "score", "normalized_score", "decision"]


class ImageResult(Protocol):
    """What evaluation reads of a prediction (see :class:`msflow.infer.predictor.Prediction`)."""

    score: float
    anomaly_map: np.ndarray
    image_map: np.ndarray


def overlay_indices(samples: list[Sample], count: int = NUM_OVERLAYS) -> set[int]:
    """A fixed, spread-out sample: defective images first (that is where the maps matter), then good."""
    order = [i for i, s in enumerate(samples) if s.label == 1] + [
        i for i, s in enumerate(samples) if s.label == 0
    ]
    step = max(1, len(order) // count) if count else 1
    return set(order[::step][:count])


def _mask_at(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """The ground truth at the map's resolution (nearest resize when evaluating at model size)."""
    if sample.mask is None:
        return np.zeros(shape, bool)
    mask = read_mask(sample.mask)
    if mask.shape == shape:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def evaluate_stream(
    samples: list[Sample],
    results: Iterable[ImageResult],
    threshold: Threshold | None = None,
    out_dir: Path | None = None,
    pro_mode: str = "standard",
    pixel_range: tuple[float, float] = (0.0, 3.0),
    resolution: str = "original",
    bins: int = DEFAULT_BINS,
    num_overlays: int = NUM_OVERLAYS,
) -> dict[str, Any]:
    """Metrics of ``results`` (one per sample, same order); with ``out_dir`` also the report.

    The report is ``predictions.csv`` (written row by row), ``overlays/*.png`` for a sample of images
    and ``score_histogram.png``. Pixel metrics and AUPRO need masks; metrics the test set cannot give
    (one class only, no defect pixels) are listed under ``not_available`` with the reason. With a
    threshold, ``false_positive_rate`` is the share of good test images judged defective.
    """
    acc = StreamingMetrics(pixel_range=pixel_range, bins=bins, pro_mode=pro_mode)
    with_masks = any(s.mask is not None for s in samples)
    draw = overlay_indices(samples, num_overlays) if out_dir is not None else set()
    writer = report.RowWriter(out_dir / "predictions.csv", CSV_FIELDS) if out_dir is not None else None
    good, flagged, seen = 0, 0, 0
    try:
        for i, (sample, res) in enumerate(zip(samples, results, strict=False)):
            seen += 1
            acc.add_image(res.score, sample.label, sample.defect_type)
            gt = _mask_at(sample, res.anomaly_map.shape) if with_masks or i in draw else None
            if with_masks:
                acc.add_maps(gt, res.anomaly_map, res.image_map)
            defective = threshold.is_defective(res.score) if threshold is not None else None
            if sample.label == 0 and defective is not None:
                good, flagged = good + 1, flagged + int(defective)
            if writer is not None and threshold is not None:
                writer.write(
                    {
                        "image": str(sample.image),
                        "label": sample.label,
                        "defect_type": sample.defect_type,
                        "score": res.score,
                        "normalized_score": float(threshold.normalize(res.score)),
                        "decision": "defective" if defective else "good",
                    }
                )
            if i in draw and out_dir is not None and threshold is not None:
                image = to_uint8(read_image(sample.image))
                h, w = res.anomaly_map.shape
                if image.shape[:2] != (h, w):  # model resolution: draw on the resized image
                    image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
                report.save_overlay(
                    out_dir / "overlays" / f"{i:04d}_{sample.defect_type}_{sample.image.stem}.png",
                    image,
                    res.image_map,
                    gt_mask=gt if sample.mask is not None else None,
                    pred_mask=threshold.defect_mask(res.anomaly_map, bool(defective)) if defective else None,
                )
    finally:
        if writer is not None:
            writer.close()
    if seen != len(samples):
        raise DataError(f"evaluation got {seen} predictions for {len(samples)} test images")
    metrics = acc.result()
    metrics["test_images"] = len(samples)
    metrics["eval_resolution"] = resolution
    if good and threshold is not None:
        metrics["false_positive_rate"] = round(100.0 * flagged / good, 4)
    if out_dir is not None:
        scores = np.frombuffer(acc.scores, dtype=np.float64)
        labels = np.frombuffer(acc.labels, dtype=np.int8)
        report.plot_score_histogram(
            out_dir / "score_histogram.png", scores, labels, threshold.image if threshold else None
        )
    return metrics


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
