"""Decision thresholds and normalised scores.

The rules (docs/choices.md, "Thresholds"): quantiles of held-out good images by default, F1-optimal on a
labelled validation folder; the normalised score puts the threshold at 0.5. A predicted defect mask is
empty in images judged good, so a good part never shows spurious defect regions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from msflow.errors import MSFlowError
from msflow.evaluate.metrics import f1_max
from msflow.evaluate.streaming import DEFAULT_BINS, Binning, Mergeable, f1_max_from_histograms

IMAGE_QUANTILE = 0.99
PIXEL_QUANTILE = 0.999


@dataclass(frozen=True)
class Threshold:
    image: float  # raw image-score threshold: score >= image means defective
    pixel: float  # raw pixel-map threshold for the defect mask
    score_min: float  # range of the calibration scores, for the normalised score
    score_max: float
    method: str
    num_images: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Threshold:
        return cls(**data)

    @classmethod
    def of_scores(cls, image: float, pixel: float, scores: np.ndarray, method: str) -> Threshold:
        """The thresholds, with the calibration ``scores``' range and count."""
        return cls(image, pixel, float(scores.min()), float(scores.max()), method, int(scores.size))

    def with_image_threshold(self, value: float) -> Threshold:
        """The ``--threshold`` override: a raw image-score threshold chosen by the user."""
        return replace(self, image=float(value), method="user")

    def is_defective(self, score: float) -> bool:
        """The decision rule, written only here: a score at or above the image threshold is a defect."""
        return bool(score >= self.image)

    def defect_mask(self, pixel_map: np.ndarray, defective: bool) -> np.ndarray:
        """Predicted defect pixels: ``pixel_map >= pixel`` in images judged defective, else none."""
        return (pixel_map >= self.pixel) & defective

    def normalize(self, scores: np.ndarray | float) -> np.ndarray:
        """``clip(0.5 + (score - image) / (score_max - score_min), 0, 1)``: the threshold at 0.5."""
        spread = self.score_max - self.score_min
        spread = spread if spread > 0 else 1.0
        return np.clip(0.5 + (np.asarray(scores, dtype=np.float64) - self.image) / spread, 0.0, 1.0)


def _quantile(binning: Binning, counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of histogrammed values: the upper edge of the bin holding the value of rank
    ceil(q * (n - 1)) (0-based). Never below ``np.quantile``'s linear interpolation, and at most one bin
    width above that value."""
    rank = math.ceil(q * (float(counts.sum()) - 1))
    b = int(np.searchsorted(np.cumsum(counts, dtype=np.float64), rank, side="right"))
    return float(binning.edge(min(b, binning.bins - 1) + 1))


class GoodImageCalibration(Mergeable):
    """Quantile thresholds from defect-free images, fed image by image: image scores are kept (one float
    each), pixel values counted into a fixed histogram over the "add" map's range."""

    def __init__(self, pixel_range: tuple[float, float], bins: int = DEFAULT_BINS) -> None:
        self.binning = Binning(*pixel_range, bins)
        self.scores: list[float] = []
        self.pixels = np.zeros(bins, np.int64)

    def add(self, score: float, pixel_map: np.ndarray | None) -> None:
        self.scores.append(float(score))
        if pixel_map is not None:
            self.pixels += self.binning.counts(pixel_map)

    # merging (data-parallel calibration, see streaming.Mergeable): quantiles, min and max do not
    # depend on the order of the scores, and the int64 pixel counts add exactly
    def histograms(self) -> list[np.ndarray]:
        return [self.pixels]

    def image_state(self) -> dict[str, Any]:
        return {"scores": list(self.scores)}

    def add_image_state(self, state: dict[str, Any]) -> None:
        self.scores.extend(float(s) for s in state["scores"])

    def empty_copy(self) -> GoodImageCalibration:
        return GoodImageCalibration((self.binning.lo, self.binning.hi), self.binning.bins)

    def threshold(self, method: str = "holdout") -> Threshold:
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.size == 0:
            raise MSFlowError("threshold calibration needs at least one good image")
        pixel = _quantile(self.binning, self.pixels, PIXEL_QUANTILE) if self.pixels.any() else float("inf")
        image = float(np.quantile(scores, IMAGE_QUANTILE))
        return Threshold.of_scores(image, pixel, scores, f"{method}-good-q{IMAGE_QUANTILE}")


class LabelledCalibration:
    """F1-optimal thresholds from a labelled validation set (pixel threshold only with masks)."""

    def __init__(self, pixel_range: tuple[float, float], bins: int = DEFAULT_BINS) -> None:
        self.binning = Binning(*pixel_range, bins)
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.pos, self.neg = np.zeros(bins, np.int64), np.zeros(bins, np.int64)

    def add(self, score: float, label: int, mask: np.ndarray | None, pixel_map: np.ndarray) -> None:
        self.scores.append(float(score))
        self.labels.append(int(label))
        if mask is not None:
            pos, neg = self.binning.joint_counts(pixel_map, mask)
            self.pos, self.neg = self.pos + pos, self.neg + neg

    def threshold(self, fallback_pixel: float) -> Threshold:
        scores, labels = np.asarray(self.scores, dtype=np.float64), np.asarray(self.labels)
        if labels.size == 0 or labels.min() == labels.max():
            raise MSFlowError("the validation folder needs both good and defective images for F1 calibration")
        _, image_t = f1_max(labels, scores)
        pixel_t = fallback_pixel
        if self.pos.any() and self.neg.any():
            _, pixel_t, _ = f1_max_from_histograms(self.pos, self.neg, self.binning)
        return Threshold.of_scores(float(image_t), float(pixel_t), scores, "validation-f1")
