"""Metrics and the report of a model's predictions on a labelled test set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msflow.data.datasets import Sample
from msflow.data.images import read_image, read_mask, to_uint8
from msflow.evaluate import report
from msflow.evaluate.metrics import evaluate
from msflow.evaluate.threshold import Threshold
from msflow.files import atomic_write_bytes

NUM_OVERLAYS = 16


@dataclass
class Predictions:
    """Scores and maps of an evaluated set, maps at each image's original resolution."""

    scores: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    pixel_maps: list[np.ndarray]  # "add" maps (empty unless asked)
    image_maps: list[np.ndarray]  # "mul" maps (empty unless asked)
    seconds: float = 0.0


def masks_for(samples: list[Sample], maps: list[np.ndarray]) -> list[np.ndarray]:
    return [
        read_mask(s.mask) if s.mask is not None else np.zeros(m.shape, bool)
        for s, m in zip(samples, maps, strict=True)
    ]


def evaluate_predictions(preds: Predictions, samples: list[Sample], pro_mode: str = "standard") -> dict:
    """Image metrics always; pixel metrics and AUPRO when the set has masks (at original resolution)."""
    has_masks = any(s.mask is not None for s in samples) and bool(preds.pixel_maps)
    masks = masks_for(samples, preds.pixel_maps) if has_masks else None
    return evaluate(
        preds.labels,
        preds.scores,
        preds.defect_types,
        masks=masks,
        maps=preds.pixel_maps if has_masks else None,
        pro_maps=preds.image_maps if has_masks else None,
        pro_mode=pro_mode,
    )


def write_test_report(
    run_dir: Path, samples: list[Sample], preds: Predictions, threshold: Threshold, metrics: dict | None
) -> None:
    """Per-image CSV, overlays for a sample of images, score histogram and metrics.json."""
    normalized = threshold.normalize(preds.scores)
    rows = [
        {
            "image": str(s.image),
            "label": s.label,
            "defect_type": s.defect_type,
            "score": float(sc),
            "normalized_score": float(ns),
            "decision": "defective" if sc >= threshold.image else "good",
        }
        for s, sc, ns in zip(samples, preds.scores, normalized, strict=True)
    ]
    report.write_predictions_csv(run_dir / "predictions.csv", rows)
    report.plot_score_histogram(run_dir / "score_histogram.png", preds.scores, preds.labels, threshold.image)
    if metrics is not None:
        atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    if not preds.image_maps:
        return
    # A fixed, spread-out sample: defective images first (that is where the maps matter), then good ones.
    order = [i for i, s in enumerate(samples) if s.label == 1] + [
        i for i, s in enumerate(samples) if s.label == 0
    ]
    step = max(1, len(order) // NUM_OVERLAYS)
    for i in order[::step][:NUM_OVERLAYS]:
        s = samples[i]
        pred_mask = preds.pixel_maps[i] >= threshold.pixel if preds.scores[i] >= threshold.image else None
        gt = read_mask(s.mask) if s.mask is not None else None
        report.save_overlay(
            run_dir / "overlays" / f"{i:04d}_{s.defect_type}_{s.image.stem}.png",
            to_uint8(read_image(s.image)),
            preds.image_maps[i],
            gt_mask=gt,
            pred_mask=pred_mask,
        )
