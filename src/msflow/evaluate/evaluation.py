"""Evaluate a stream of predictions on a labelled test set: metrics and the report, in bounded memory.

Each image's maps are consumed as they arrive: its ground truth is read, the streaming metrics are
updated, its CSV row is written (and flushed) and, for a fixed sample of images, an overlay is drawn;
then the maps are dropped. Memory is one image's maps plus the fixed-size accumulators of
:mod:`msflow.evaluate.streaming`, whatever the number of test images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from msflow.data.datasets import Sample
from msflow.data.images import read_image, read_mask, resize_mask, to_uint8
from msflow.errors import DataError
from msflow.evaluate import report
from msflow.evaluate.streaming import StreamingMetrics
from msflow.evaluate.threshold import Threshold
from msflow.files import atomic_write_bytes

NUM_OVERLAYS = 16


class ImageResult(Protocol):
    """What evaluation reads of a prediction (see :class:`msflow.infer.predictor.Prediction`)."""

    score: float
    anomaly_map: np.ndarray
    image_map: np.ndarray


def overlay_indices(samples: list[Sample], count: int = NUM_OVERLAYS) -> set[int]:
    """A fixed, spread-out sample: defective images first (that is where the maps matter), then good."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i].label)  # stable: image order kept
    step = max(1, len(order) // count) if count else 1
    return set(order[::step][:count])


def _mask_at(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """The ground truth at the map's resolution (nearest resize when evaluating at model size)."""
    return np.zeros(shape, bool) if sample.mask is None else resize_mask(read_mask(sample.mask), shape)


class ShardMerge(Protocol):
    """How the ranks of a data-parallel job share one evaluation (:class:`msflow.train.distributed.
    Distributed`): each rank streams its contiguous shard of the samples into its own accumulator, then
    the accumulators are merged on rank 0, which alone writes the report."""

    def shard(self, n: int) -> range: ...

    def merge_to_main(self, acc: StreamingMetrics) -> tuple[StreamingMetrics, list[int]] | None:
        """On rank 0: the accumulator of all ranks' images in rank order, and each rank's image count;
        ``None`` on the other ranks."""


def evaluate_stream(
    samples: list[Sample],
    results: Iterable[ImageResult],
    threshold: Threshold | None = None,
    out_dir: Path | None = None,
    pro_mode: str = "standard",
    pixel_range: tuple[float, float] = (0.0, 3.0),
    resolution: str = "original",
    sharding: ShardMerge | None = None,
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None = None,
    replay: Callable[[], Iterable[ImageResult]] | None = None,
) -> dict[str, Any]:
    """Metrics of ``results`` (one per sample, same order); with ``out_dir`` also the report
    (``predictions.csv`` row by row, ``overlays/*.png`` for a sample of images, ``score_histogram.png``,
    with a threshold the data of report.html). Metrics the test set cannot give are listed under
    ``not_available``; with a threshold, :func:`decision_rates` are added. Results that also carry maps at
    the model's resolution (``model_anomaly_map``, ``model_image_map``) get pixel metrics there too, under
    ``model_resolution``. ``replay`` gives the same results again, for up to ``MAX_PASSES`` passes into
    finer bins while an error bound is above ``streaming.BOUND_TARGET``.

    With ``sharding``, ``results`` are this rank's shard's only; rank 0 gets the merged metrics and
    writes the same report as one process (overlays from ``redraw``, which predicts the few images to
    draw) plus ``test_images_per_rank``; the other ranks return ``{}`` (no refinement or model resolution).
    """
    acc = _Accumulators(StreamingMetrics(pixel_range=pixel_range, pro_mode=pro_mode), None)
    mine = sharding.shard(len(samples)) if sharding is not None else range(len(samples))
    out = _Report(out_dir, samples, threshold, overlay_indices(samples), redraw) if out_dir else None
    rows_here = out is not None and threshold is not None and sharding is None  # else after the merge
    _first_pass(acc, samples, results, mine, out if rows_here else None)
    per_rank: list[int] | None = None
    if sharding is not None:
        merged = sharding.merge_to_main(acc.main)
        if merged is None:
            return {}
        acc, per_rank = _Accumulators(merged[0], None), merged[1]
        if out is not None and threshold is not None:
            out.rows_after_merge(acc.main.scores)
    elif replay is not None:
        acc = _refine(acc, samples, replay)
    metrics = {**acc.main.result(), "test_images": len(samples), "eval_resolution": resolution}
    if acc.model is not None:
        model, missing = acc.model.pixel_metrics()
        metrics["model_resolution"] = model or {"not_available": missing}
    if threshold is not None:
        metrics.update(decision_rates(*acc.main.image_arrays(), threshold))
    if per_rank is not None:
        metrics["test_images_per_rank"] = per_rank
    if out is not None:
        out.figures(acc.main)
    return metrics


MAX_PASSES = 4  # over the maps, the first included: each refinement splits the bins that err most


def _add_maps(acc: StreamingMetrics, sample: Sample, anomaly_map: np.ndarray, image_map: np.ndarray) -> None:
    acc.add_maps(_mask_at(sample, anomaly_map.shape), anomaly_map, image_map)


@dataclass
class _Accumulators:
    """What one pass over the maps fills: the evaluation resolution's metrics and, when the results carry
    them, the model resolution's (``None`` until a result does)."""

    main: StreamingMetrics
    model: StreamingMetrics | None

    def add_maps(self, sample: Sample, res: ImageResult) -> None:
        """One image's maps (and its maps at model resolution, when it has them and they differ)."""
        _add_maps(self.main, sample, res.anomaly_map, res.image_map)
        small = getattr(res, "model_anomaly_map", None)
        if small is None or small.shape == res.anomaly_map.shape:
            return
        if self.model is None:
            if self.main.map_images > 1:
                raise DataError("only some results carry maps at the model resolution")
            self.model = self.main.empty_copy()
        _add_maps(self.model, sample, small, getattr(res, "model_image_map"))  # noqa: B009


def _first_pass(
    acc: _Accumulators,
    samples: list[Sample],
    results: Iterable[ImageResult],
    mine: range,
    out: _Report | None,
) -> None:
    """Stream this process's results into ``acc``; with ``out`` also write the CSV rows and overlays."""
    with_masks = any(s.mask is not None for s in samples)
    seen = 0
    with out.rows() if out is not None else nullcontext() as rows:
        for i, res in zip(mine, results, strict=False):
            sample = samples[i]
            seen += 1
            acc.main.add_image(res.score, sample.label, sample.defect_type)
            if with_masks:
                acc.add_maps(sample, res)
            if out is not None:
                rows.write(out.row(sample, res.score))
                if i in out.draw:
                    out.overlay(i, res)
    if seen != len(mine):
        raise DataError(f"evaluation got {seen} predictions for {len(mine)} test images")


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
                _add_maps(main, sample, res.anomaly_map, res.image_map)
            if model is not None:
                _add_maps(model, sample, getattr(res, "model_anomaly_map"), getattr(res, "model_image_map"))  # noqa: B009
            replayed += 1
        if replayed != len(samples):
            raise DataError(f"the refinement pass got {replayed} predictions for {len(samples)} test images")
        for finer, first in ((main, acc.main), (model, acc.model)):
            if finer is not None:  # refined from ``first``
                finer.check_same_maps(first)
        acc = _Accumulators(main or acc.main, model or acc.model)
    return acc


def decision_rates(scores: np.ndarray, labels: np.ndarray, threshold: Threshold) -> dict[str, float]:
    """At the threshold, in percent: good test images judged defective (``false_positive_rate``) and
    defective ones judged good (``miss_rate``); a class the test set lacks gives no rate."""
    judged = np.array([threshold.is_defective(float(s)) for s in scores], bool)
    wrong = {"false_positive_rate": judged[labels == 0], "miss_rate": ~judged[labels == 1]}
    return {key: round(100.0 * float(w.mean()), 4) for key, w in wrong.items() if w.size}


@dataclass
class _Report:
    """The report's files in ``out_dir``: CSV rows and overlays need the ``threshold`` (the decision),
    ``draw`` are the images to overlay, and ``redraw`` predicts a few images again (those to draw after a
    sharded evaluation, the gallery's)."""

    out_dir: Path
    samples: list[Sample]
    threshold: Threshold | None
    draw: set[int]
    redraw: Callable[[list[Sample]], Iterable[ImageResult]] | None

    def rows(self) -> closing[report.RowWriter]:
        return closing(report.RowWriter(self.out_dir / "predictions.csv", report.PREDICTION_FIELDS))

    def row(self, sample: Sample, score: float) -> dict[str, Any]:
        assert self.threshold is not None  # rows are written only with a decision
        return {
            "image": str(sample.image),
            "label": sample.label,
            "defect_type": sample.defect_type,
            "score": score,
            "normalized_score": float(self.threshold.normalize(score)),
            "decision": "defective" if self.threshold.is_defective(score) else "good",
            "threshold": self.threshold.image,
        }

    def rows_after_merge(self, scores: Iterable[float]) -> None:
        """Rank 0 of a sharded evaluation: the CSV rows from the merged scores, the overlays redrawn."""
        with self.rows() as rows:
            for sample, score in zip(self.samples, scores, strict=True):
                rows.write(self.row(sample, score))
        if self.draw and self.redraw is None:
            raise DataError("a sharded evaluation needs redraw() to draw its overlays")
        chosen = sorted(self.draw)
        for i, res in zip(chosen, self._redrawn(chosen), strict=True):
            self.overlay(i, res)

    def _redrawn(self, chosen: list[int]) -> Iterable[ImageResult]:
        return self.redraw([self.samples[i] for i in chosen]) if chosen and self.redraw else ()

    def overlay(self, i: int, res: ImageResult, path: Path | None = None) -> None:
        """Image ``i`` with its map, ground truth and predicted defect (default: under ``overlays/``)."""
        assert self.threshold is not None  # overlays are drawn only with a decision
        sample = self.samples[i]
        image = to_uint8(read_image(sample.image))
        h, w = res.anomaly_map.shape
        if image.shape[:2] != (h, w):  # model resolution: draw on the resized image
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        path = path or self.out_dir / "overlays" / f"{i:04d}_{sample.defect_type}_{sample.image.stem}.png"
        pred = self.threshold.defect_mask(res.anomaly_map, self.threshold.is_defective(res.score))
        report.save_overlay(path, image, res.image_map, gt_mask=_mask_at(sample, (h, w)), pred_mask=pred)

    def figures(self, acc: StreamingMetrics) -> None:
        """``score_histogram.png`` and, with a threshold, what report.html shows (``report_data.json``):
        the ROC/PR curves (image level from the scores, pixel level from the histograms already
        accumulated) and the gallery, whose few images ``redraw`` predicts again (none without it)."""
        scores, labels = acc.image_arrays()
        threshold = self.threshold
        histogram = self.out_dir / "score_histogram.png"
        report.plot_score_histogram(histogram, scores, labels, threshold.image if threshold else None)
        if threshold is None:
            return
        curves = {"image": report.image_curves(labels, scores)}
        if acc.map_images:
            curves["pixel"] = report.histogram_curves(acc.pixel.pos, acc.pixel.neg)
        picks = report.gallery_picks(scores, labels, threshold.image) if self.redraw is not None else []
        gallery = []
        for (i, kind), res in zip(picks, self._redrawn([i for i, _ in picks]), strict=True):
            name = f"gallery/{kind}_{i:04d}.png"
            self.overlay(i, res, self.out_dir / name)
            decision = "defective" if threshold.is_defective(float(scores[i])) else "good"
            entry = {"kind": kind, "file": name, "name": self.samples[i].image.name, "label": int(labels[i])}
            gallery.append({**entry, "score": float(scores[i]), "decision": decision})
        data = {"threshold": threshold.image, "curves": curves, "gallery": gallery}
        atomic_write_bytes(self.out_dir / "report_data.json", json.dumps(data).encode())


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
