"""Decision thresholds and normalised scores.

Rules (stored with the model, overridable with ``--threshold``):

- **Good images only (default).** Part of ``train/good`` is held out from training (``holdout_fraction``).
  The image threshold is the 99th percentile of their image scores, the pixel threshold the 99.9th
  percentile of their pixel-map values: about 1 % of good parts are expected to be flagged.
- **Labelled validation folder.** The image threshold maximises image-level F1 on it, and the pixel
  threshold pixel-level F1 when it has masks.

The normalised score follows anomalib's convention, so the threshold sits at 0.5:
``clip(0.5 + (score - threshold) / (max - min), 0, 1)`` with min/max the calibration scores' range.
A predicted defect mask is ``pixel_map >= pixel threshold`` within images judged defective (empty for
images judged good, so a good part never shows spurious defect regions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from msflow.errors import MSFlowError
from msflow.evaluate.metrics import f1_max

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

    def with_image_threshold(self, value: float) -> Threshold:
        """The ``--threshold`` override: a raw image-score threshold chosen by the user."""
        return Threshold(float(value), self.pixel, self.score_min, self.score_max, "user", self.num_images)

    def normalize(self, scores: np.ndarray | float) -> np.ndarray:
        spread = self.score_max - self.score_min
        spread = spread if spread > 0 else 1.0
        return np.clip(0.5 + (np.asarray(scores, dtype=np.float64) - self.image) / spread, 0.0, 1.0)


def _pixels(maps: list[np.ndarray], limit: int = 5_000_000) -> np.ndarray:
    values = np.concatenate([m.ravel() for m in maps]) if maps else np.zeros(0)
    if values.size > limit:  # an even subsample keeps the quantile honest and the memory bounded
        values = values[:: values.size // limit + 1]
    return values


def from_good_images(scores: np.ndarray, pixel_maps: list[np.ndarray], method: str = "holdout") -> Threshold:
    """Quantile thresholds from defect-free images (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise MSFlowError("threshold calibration needs at least one good image")
    return Threshold(
        image=float(np.quantile(scores, IMAGE_QUANTILE)),
        pixel=float(np.quantile(_pixels(pixel_maps), PIXEL_QUANTILE)) if pixel_maps else float("inf"),
        score_min=float(scores.min()),
        score_max=float(scores.max()),
        method=f"{method}-good-q{IMAGE_QUANTILE}",
        num_images=int(scores.size),
    )


def from_labelled(
    scores: np.ndarray,
    labels: np.ndarray,
    pixel_maps: list[np.ndarray],
    masks: list[np.ndarray] | None,
    fallback_pixel: float,
) -> Threshold:
    """F1-optimal thresholds from a labelled validation set (pixel threshold only with masks)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if labels.min() == labels.max():
        raise MSFlowError("the validation folder needs both good and defective images for F1 calibration")
    _, image_t = f1_max(labels, scores)
    pixel_t = fallback_pixel
    if masks is not None:
        _, pixel_t = f1_max(_pixels(masks), _pixels(pixel_maps))
    return Threshold(
        float(image_t),
        float(pixel_t),
        float(scores.min()),
        float(scores.max()),
        "validation-f1",
        int(scores.size),
    )
