"""Evaluate a stream of predictions on a labelled test set: metrics and the report, in bounded memory.

Each image's maps are consumed as they arrive: its ground truth is read, the streaming metrics are
updated, its CSV row is written (and flushed) and, for a fixed sample of images, an overlay is drawn;
then the maps are dropped. Memory is one image's maps plus the fixed-size accumulators of
:mod:`msflow.evaluate.streaming`, whatever the number of test images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from msflow.data.datasets import Sample
from msflow.data.images import read_image, read_mask, resize_mask, to_uint8
from msflow.errors import DataError
from msflow.evaluate import report
from msflow.evaluate.streaming import DEFAULT_BINS, StreamingMetrics
from msflow.evaluate.threshold import Threshold
from msflow.files import atomic_write_bytes

NUM_OVERLAYS = 16
CSV_FIELDS = report.PREDICTION_FIELDS


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
    return resize_mask(read_mask(sample.mask), shape)


class ShardMerge(Protocol):
    """How the ranks of a data-parallel job share one evaluation (:class:`msflow.train.distributed.
    Distributed`): each rank streams its contiguous shard of the samples into its own accumulator, then
    the accumulators are merged on rank 0, which alone writes the report."""

    def shard(self, n: int) -> range: ...

    def merge_to_main(self, acc: StreamingMetrics) -> tuple[StreamingMetrics, list[int]] | None:
        """On rank 0: the accumulator of all ranks' images in rank order, and each rank's image count;
        ``None`` on the other ranks."""
        ...


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
    sharding: ShardMerge | None = None,
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None = None,
    replay: Callable[[], Iterable[ImageResult]] | None = None,
) -> dict[str, Any]:
    """Metrics of ``results`` (one per sample, same order); with ``out_dir`` also the report.

    The report is ``predictions.csv`` (written row by row), ``overlays/*.png`` for a sample of images
    and ``score_histogram.png``. Pixel metrics and AUPRO need masks; metrics the test set cannot give
    (one class only, no defect pixels) are listed under ``not_available`` with the reason. With a
    threshold, ``false_positive_rate`` is the share of good test images judged defective. Results that
    also carry their maps at the model's resolution (``model_anomaly_map``, ``model_image_map``) get the
    pixel metrics at that resolution too, under ``model_resolution``.

    ``replay`` gives the same results again: when a metric's error bound is above
    ``streaming.BOUND_TARGET``, the maps are streamed again into finer bins (up to ``MAX_PASSES`` passes
    in all), so every bound reported meets it unless the passes run out.

    With ``sharding`` (data-parallel), ``results`` are those of this rank's shard of ``samples`` only;
    rank 0 gets the merged metrics and writes the same report as one process (its rows are rebuilt
    from the merged scores, its overlays from ``redraw``, which predicts the few images to draw) plus
    ``test_images_per_rank``; the other ranks return ``{}`` (no refinement, no model resolution).
    """
    acc = _Accumulators.empty(pixel_range, bins, pro_mode)
    mine = sharding.shard(len(samples)) if sharding is not None else range(len(samples))
    draw = overlay_indices(samples, num_overlays) if out_dir is not None else set()
    report_here = out_dir is not None and threshold is not None and sharding is None  # else after the merge
    _first_pass(acc, samples, results, mine, threshold if report_here else None, out_dir, draw)
    per_rank: list[int] | None = None
    if sharding is not None:
        merged = sharding.merge_to_main(acc.main)
        if merged is None:
            return {}
        acc, per_rank = _Accumulators(merged[0], None), merged[1]
        if out_dir is not None and threshold is not None:
            _report_after_merge(acc.main, samples, threshold, out_dir, draw, redraw)
    elif replay is not None:
        acc = _refine(acc, samples, replay)
    metrics = _summary(acc, samples, resolution, threshold, per_rank)
    if out_dir is not None:
        _write_figures(out_dir, acc.main, samples, threshold, redraw)
    return metrics


MAX_PASSES = 4  # over the maps, the first included: each refinement splits the bins that err most


@dataclass
class _Accumulators:
    """What one pass over the maps fills: the evaluation resolution's metrics and, when the results carry
    them, the model resolution's (``None`` until a result does)."""

    main: StreamingMetrics
    model: StreamingMetrics | None

    @classmethod
    def empty(cls, pixel_range: tuple[float, float], bins: int, pro_mode: str) -> _Accumulators:
        return cls(StreamingMetrics(pixel_range=pixel_range, bins=bins, pro_mode=pro_mode), None)

    def add_maps(self, sample: Sample, res: ImageResult) -> None:
        """One image's maps (and its maps at model resolution, when it has them and they differ)."""
        self.main.add_maps(_mask_at(sample, res.anomaly_map.shape), res.anomaly_map, res.image_map)
        small = getattr(res, "model_anomaly_map", None)
        if small is None or small.shape == res.anomaly_map.shape:
            return
        if self.model is None:
            if self.main.map_images > 1:
                raise DataError("only some results carry maps at the model resolution")
            self.model = self.main.empty_copy()
        self.model.add_maps(_mask_at(sample, small.shape), small, res.model_image_map)


def _first_pass(
    acc: _Accumulators,
    samples: list[Sample],
    results: Iterable[ImageResult],
    mine: range,
    threshold: Threshold | None,
    out_dir: Path | None,
    draw: set[int],
) -> None:
    """Stream this process's results into ``acc``; with a ``threshold`` also write the CSV rows and
    overlays (then ``out_dir`` is set)."""
    with_masks = any(s.mask is not None for s in samples)
    writer = report.RowWriter(out_dir / "predictions.csv", CSV_FIELDS) if threshold and out_dir else None
    seen = 0
    try:
        for i, res in zip(mine, results, strict=False):
            sample = samples[i]
            seen += 1
            acc.main.add_image(res.score, sample.label, sample.defect_type)
            if with_masks:
                acc.add_maps(sample, res)
            if writer is not None and threshold is not None:
                writer.write(_row(sample, res.score, threshold))
                if i in draw and out_dir is not None:
                    _draw_overlay(out_dir, i, sample, res, _mask_at(sample, res.anomaly_map.shape), threshold)
    finally:
        if writer is not None:
            writer.close()
    if seen != len(mine):
        raise DataError(f"evaluation got {seen} predictions for {len(mine)} test images")


def _report_after_merge(
    acc: StreamingMetrics,
    samples: list[Sample],
    threshold: Threshold,
    out_dir: Path,
    draw: set[int],
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None,
) -> None:
    """Rank 0 of a sharded evaluation: the CSV rows from the merged scores, the overlays redrawn."""
    rows = report.RowWriter(out_dir / "predictions.csv", CSV_FIELDS)
    try:
        for sample, score in zip(samples, acc.scores, strict=True):
            rows.write(_row(sample, score, threshold))
    finally:
        rows.close()
    if draw and redraw is None:
        raise DataError("a sharded evaluation needs redraw() to draw its overlays")
    chosen = sorted(draw)
    for i, res in zip(chosen, redraw([samples[i] for i in chosen]) if draw else (), strict=True):
        gt = _mask_at(samples[i], res.anomaly_map.shape)
        _draw_overlay(out_dir, i, samples[i], res, gt, threshold)


def _refine(
    acc: _Accumulators, samples: list[Sample], replay: Callable[[], Iterable[ImageResult]]
) -> _Accumulators:
    """Stream the maps again into finer bins while a bound is above target (see ``streaming``)."""
    for _ in range(MAX_PASSES - 1):
        main = acc.main.refined()
        model = acc.model.refined() if acc.model is not None else None
        if main is None and model is None:
            break
        replayed = 0
        for sample, res in zip(samples, replay(), strict=False):
            if main is not None:
                main.add_maps(_mask_at(sample, res.anomaly_map.shape), res.anomaly_map, res.image_map)
            if model is not None:
                small = getattr(res, "model_anomaly_map")  # noqa: B009 (not in the ImageResult protocol)
                model.add_maps(_mask_at(sample, small.shape), small, getattr(res, "model_image_map"))  # noqa: B009
            replayed += 1
        if replayed != len(samples):
            raise DataError(f"the refinement pass got {replayed} predictions for {len(samples)} test images")
        for finer, first in ((main, acc.main), (model, acc.model)):
            if finer is not None and first is not None:
                finer.check_same_maps(first)
        acc = _Accumulators(main or acc.main, model or acc.model)
    return acc


def _scores_labels(acc: StreamingMetrics) -> tuple[np.ndarray, np.ndarray]:
    return np.frombuffer(acc.scores, dtype=np.float64), np.frombuffer(acc.labels, dtype=np.int8)


def _summary(
    acc: _Accumulators,
    samples: list[Sample],
    resolution: str,
    threshold: Threshold | None,
    per_rank: list[int] | None,
) -> dict[str, Any]:
    """The metrics dictionary: the accumulated metrics, the test set's size and the decision figures."""
    metrics = acc.main.result()
    metrics["test_images"] = len(samples)
    metrics["eval_resolution"] = resolution
    if acc.model is not None:
        model, missing = acc.model.pixel_metrics()
        metrics["model_resolution"] = model or {"not_available": missing}
    scores, labels = _scores_labels(acc.main)
    if threshold is not None:
        metrics.update(decision_rates(scores, labels, threshold))
    if per_rank is not None:
        metrics["test_images_per_rank"] = per_rank
    return metrics


def decision_rates(scores: np.ndarray, labels: np.ndarray, threshold: Threshold) -> dict[str, float]:
    """At the threshold, in percent: good test images judged defective (``false_positive_rate``) and
    defective ones judged good (``miss_rate``); a class the test set lacks gives no rate."""
    judged = np.array([threshold.is_defective(float(s)) for s in scores], bool)
    rates = {}
    if (labels == 0).any():
        rates["false_positive_rate"] = round(100.0 * float(judged[labels == 0].mean()), 4)
    if (labels == 1).any():
        rates["miss_rate"] = round(100.0 * float((~judged[labels == 1]).mean()), 4)
    return rates


def _write_figures(
    out_dir: Path,
    acc: StreamingMetrics,
    samples: list[Sample],
    threshold: Threshold | None,
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None,
) -> None:
    """``score_histogram.png`` and, with a threshold, what report.html shows (``report_data.json``)."""
    scores, labels = _scores_labels(acc)
    report.plot_score_histogram(
        out_dir / "score_histogram.png", scores, labels, threshold.image if threshold else None
    )
    if threshold is not None:
        _write_report_data(out_dir, acc, samples, threshold, redraw)


def _write_report_data(
    out_dir: Path,
    acc: StreamingMetrics,
    samples: list[Sample],
    threshold: Threshold,
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None,
) -> None:
    """``report_data.json`` for report.html: the ROC/PR curves (image level from the scores, pixel
    level from the histograms already accumulated) and the gallery, whose few images ``redraw``
    predicts again (no gallery without it)."""
    scores = np.frombuffer(acc.scores, dtype=np.float64)
    labels = np.frombuffer(acc.labels, dtype=np.int8).astype(np.int64)
    curves = {"image": report.image_curves(labels, scores)}
    if acc.map_images:
        curves["pixel"] = report.histogram_curves(acc.pixel.pos, acc.pixel.neg)
    picks = report.gallery_picks(scores, labels, threshold.image) if redraw is not None else []
    gallery = []
    chosen = [samples[i] for i, _ in picks]
    for (i, kind), res in zip(picks, redraw(chosen) if picks and redraw else (), strict=True):
        name = f"gallery/{kind}_{i:04d}.png"
        gt = _mask_at(samples[i], res.anomaly_map.shape)
        _draw_overlay(out_dir, i, samples[i], res, gt, threshold, out_dir / name)
        decision = "defective" if threshold.is_defective(float(scores[i])) else "good"
        entry = {"kind": kind, "file": name, "name": samples[i].image.name, "label": int(labels[i])}
        gallery.append({**entry, "score": float(scores[i]), "decision": decision})
    data = {"threshold": threshold.image, "curves": curves, "gallery": gallery}
    atomic_write_bytes(out_dir / "report_data.json", json.dumps(data).encode())


def _row(sample: Sample, score: float, threshold: Threshold) -> dict[str, Any]:
    defective = threshold.is_defective(score)
    return {
        "image": str(sample.image),
        "label": sample.label,
        "defect_type": sample.defect_type,
        "score": score,
        "normalized_score": float(threshold.normalize(score)),
        "decision": "defective" if defective else "good",
        "threshold": threshold.image,
    }


def _draw_overlay(
    out_dir: Path,
    i: int,
    sample: Sample,
    res: ImageResult,
    gt: np.ndarray | None,
    threshold: Threshold,
    path: Path | None = None,
) -> None:
    image = to_uint8(read_image(sample.image))
    h, w = res.anomaly_map.shape
    if image.shape[:2] != (h, w):  # model resolution: draw on the resized image
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    defective = threshold.is_defective(res.score)
    report.save_overlay(
        path or out_dir / "overlays" / f"{i:04d}_{sample.defect_type}_{sample.image.stem}.png",
        image,
        res.image_map,
        gt_mask=gt if sample.mask is not None else None,
        pred_mask=threshold.defect_mask(res.anomaly_map, defective) if defective else None,
    )


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
