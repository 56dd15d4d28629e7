"""Test-set metrics accumulated image by image, in memory that does not grow with the number of images.

Why histograms: the maps have a known range (model/anomaly_map.py): the "add" map lies in
[0, number of scales] and the "mul" map in [0, 1), in both normalisations, and the bilinear resize to
the original size keeps them there (it only takes convex combinations). So every pixel can be counted
into one of ``bins`` equal-width bins over that range; the curves (ROC, PR, PRO) then have a point at
every bin edge. Per-pixel state is a few fixed arrays (``bins`` int64/float64 each, 8 MiB per array
at 2^20 bins); image scores and labels are O(N) plain floats, as the exact image metrics need.

Error against the exact computation (evaluate/metrics.py), each computed from the histograms and
returned next to the metric (``*_error_bound``, in the metric's percent units):

* **Pixel AUROC.** Pairs (positive, negative) in different bins are ordered exactly; pairs in the same
  bin are counted as ties (1/2). So |streamed - exact| <= 1/2 * sum_b pos_b * neg_b / (P * N), half the
  fraction of positive-negative pairs that share a bin.
* **Pixel F1-max.** A threshold at a bin edge predicts exactly what some exact threshold predicts, so
  the streamed maximum is never above the exact one; the exact optimum lies inside one bin b, and moving
  the threshold to that bin's edge changes TP by at most pos_b and FP by at most neg_b. Since
  F1 = 2TP / (TP + FP + P), |dF1/dTP| <= 2/P and |dF1/dFP| <= 1/(2P), hence
  0 <= exact - streamed <= max_b (2 pos_b + neg_b / 2) / P.
* **AUPRO, standard mode.** Every bin edge gives a point of the exact PRO curve (PRO and FPR at
  threshold e equal those at the smallest score >= e), so the streamed curve is the exact one sampled
  at fewer points. Both are non-decreasing, so between two neighbouring streamed points the exact
  curve stays in the box dFPR_b x dPRO_b, and the trapezoid over the chord differs from the exact area
  there by at most half that box: |streamed - exact| <= sum_b dFPR_b * dPRO_b / 2 / fpr_limit over
  the bins up to the FPR limit.
* **AUPRO, official mode** (800 thresholds between the exact min and max, prediction score > θ):
  a threshold falls inside a bin, whose pixels are split linearly (as if spread evenly in the bin).
  Each curve point is then off by at most that bin's share of negatives and of region weight; the
  bound reported is the largest such share (no closed form survives the official min-max rescaling
  of the FPR axis). Tests check the result against the exact official number.

Regions for AUPRO are the 8-connected components of each image's mask, found per image; each region
pixel carries the weight 1 / (area * R), R = regions in all images, so a weight histogram gives PRO.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Protocol

import numpy as np

from msflow.errors import DataError
from msflow.evaluate.metrics import _OFFICIAL_STEPS, f1_max, image_auroc, per_defect_type, pro_curve_up_to

DEFAULT_BINS = 2**20


class Binning:
    """``bins`` equal-width bins over [lo, hi]; values outside are counted in the end bins."""

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS) -> None:
        if not hi > lo or bins < 2:
            raise DataError(f"histogram range [{lo}, {hi}] with {bins} bins is empty")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.width = (self.hi - self.lo) / self.bins

    def index(self, values: np.ndarray) -> np.ndarray:
        x = np.array(values, dtype=np.float64)  # a copy, worked on in place (1024^2 maps: 8 MiB)
        x -= self.lo
        x /= self.width
        np.clip(x, 0, self.bins - 1, out=x)  # before the cast, so huge values cannot overflow
        return x.astype(np.int64)

    def joint_counts(self, values: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts where ``positive``, counts elsewhere) in one pass (faster than two masked ones)."""
        joint = np.bincount((self.index(values) + self.bins * positive).ravel(), minlength=2 * self.bins)
        return joint[self.bins :], joint[: self.bins]

    def counts(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(self.index(values).ravel(), weights=weights, minlength=self.bins)

    def edge(self, b: int | np.ndarray) -> Any:
        """Lower edge of bin ``b``."""
        return self.lo + np.asarray(b) * self.width


def _suffix(counts: np.ndarray) -> np.ndarray:
    """``out[b]`` = sum of counts[b:], length bins + 1 (out[bins] = 0)."""
    return np.concatenate((np.cumsum(counts[::-1], dtype=np.float64)[::-1], [0.0]))


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC in percent, error bound in percent) from per-bin positive and negative counts.

    Bins run along the last axis; leading axes are independent histograms (the map choice's bootstrap
    draws are rows), each with its own AUROC. A tie within a bin counts 1/2, so the error bound is half
    the tied share of the pairs.
    """
    pos64, neg64 = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    pairs = pos64.sum(axis=-1) * neg64.sum(axis=-1)
    below = np.cumsum(neg64, axis=-1) - neg64  # negatives in lower bins
    tied = (pos64 * neg64).sum(axis=-1)
    auc = ((pos64 * below).sum(axis=-1) + 0.5 * tied) / pairs
    return auc * 100.0, 0.5 * tied / pairs * 100.0


def f1_max_from_histograms(pos: np.ndarray, neg: np.ndarray, binning: Binning) -> tuple[float, float, float]:
    """(best F1 in percent, its threshold = a bin's lower edge, error bound in percent)."""
    p = float(pos.sum())
    tp, fp = _suffix(pos)[:-1], _suffix(neg)[:-1]  # predicted positive: every bin >= b
    f1 = 2 * tp / (tp + fp + p)
    # Edges with equal F1 next to each other select the same pixels (empty bins between): take the
    # highest, the one closest to the lowest selected score (what the exact threshold is).
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    bound = float(np.max(2 * pos + neg / 2)) / p
    return float(f1[best]) * 100.0, float(binning.edge(best)), min(bound, 1.0) * 100.0


def aupro_from_histograms(weight: np.ndarray, neg: np.ndarray, fpr_limit: float = 0.3) -> tuple[float, float]:
    """Standard AUPRO (percent) and its error bound from per-bin PRO weight and negative counts.

    ``weight`` sums to 1 (each region pixel weighs 1 / (area * regions)). Curve points sit at the bin
    edges, from the top bin down, with (0, 0) first; integrated as :func:`metrics.aupro` does.
    """
    n_neg = float(neg.sum())
    fpr = _suffix(neg)[::-1] / n_neg  # threshold at edges bins, bins-1, ..., 0: non-decreasing
    pro = _suffix(weight)[::-1]
    x, y = pro_curve_up_to(fpr, pro, fpr_limit)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    bound = float(np.sum((x[1:] - x[:-1]) * (y[1:] - y[:-1])) / 2.0)
    return area / fpr_limit * 100.0, bound / fpr_limit * 100.0


def official_aupro_from_histograms(
    weight: np.ndarray, neg: np.ndarray, binning: Binning, lo: float, hi: float, fpr_limit: float = 0.3
) -> tuple[float, float]:
    """Official MSFlow PRO (percent, see :func:`metrics.aupro`) and the largest per-point error share."""
    from sklearn.metrics import auc

    if hi == lo:
        raise DataError(f"aupro(official): all map values equal {lo}, no thresholds can be built")
    thresholds = np.arange(lo, hi, (hi - lo) / _OFFICIAL_STEPS)
    n_neg = float(neg.sum())
    neg_above, w_above = _suffix(neg), _suffix(weight)
    # Pixels > θ: whole bins above θ's bin, plus the part of θ's bin above θ (spread evenly).
    pos = (np.asarray(thresholds, dtype=np.float64) - binning.lo) / binning.width
    b = np.clip(np.floor(pos).astype(np.int64), 0, binning.bins - 1)
    frac_above = np.clip(b + 1 - pos, 0.0, 1.0)
    fpr = (neg_above[b + 1] + frac_above * neg[b]) / n_neg
    pro = w_above[b + 1] + frac_above * weight[b]
    keep = fpr < fpr_limit
    f = fpr[keep]
    if np.unique(f).size < 2:
        raise DataError(f"aupro(official): need 2 distinct FPRs < {fpr_limit}, got {np.unique(f).tolist()}")
    f = (f - f.min()) / (f.max() - f.min())
    share = float(max(np.max(neg[b] / n_neg), np.max(weight[b])))
    return float(auc(f, pro[keep]) * 100.0), share * 100.0


class Mergeable(Protocol):
    """An accumulator that the ranks of a data-parallel job feed with their shards and then merge
    (:meth:`msflow.train.distributed.Distributed.merge_to_main`): histograms add, per-image state
    (``image_state()["scores"]`` and the rest) is appended in rank order."""

    def histograms(self) -> list[np.ndarray]: ...
    def add_histograms(self, histograms: list[np.ndarray]) -> None: ...
    def image_state(self) -> dict[str, Any]: ...
    def add_image_state(self, state: dict[str, Any]) -> None: ...
    def empty_copy(self) -> Any: ...


def add_histograms(into: list[np.ndarray], histograms: list[np.ndarray]) -> None:
    """``into[i] += histograms[i]``, refusing a shape or dtype mismatch (a cast could lose counts)."""
    for mine, theirs in zip(into, histograms, strict=True):
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise DataError(
                f"cannot merge histograms of {theirs.shape} {theirs.dtype} into {mine.shape} {mine.dtype}"
            )
        mine += theirs


class StreamingMetrics:
    """All test metrics of :func:`metrics.evaluate`, fed one image at a time.

    Arguments:
        pixel_range: the range of the "add" (pixel) map, (0, number of scales).
        pro_range: the range of the "mul" map used for PRO, (0, 1).
        bins: histogram bins per map (2^20: 32 MiB of state in all).
        pro_mode: "standard" or "official" AUPRO.
        fpr_limit: upper FPR bound of the AUPRO integration.
    """

    def __init__(
        self,
        pixel_range: tuple[float, float] = (0.0, 3.0),
        pro_range: tuple[float, float] = (0.0, 1.0),
        bins: int = DEFAULT_BINS,
        pro_mode: str = "standard",
        fpr_limit: float = 0.3,
    ) -> None:
        if pro_mode not in ("standard", "official"):
            raise DataError(f"aupro: mode must be 'standard' or 'official', got {pro_mode!r}")
        self.pixel_bins, self.pro_bins = Binning(*pixel_range, bins), Binning(*pro_range, bins)
        self.pro_mode, self.fpr_limit = pro_mode, fpr_limit
        self.scores, self.labels, self.type_ids = array("d"), array("b"), array("i")
        self.types: dict[str, int] = {}
        self.pix_pos = np.zeros(bins, np.int64)
        self.pix_neg = np.zeros(bins, np.int64)
        self.pro_neg = np.zeros(bins, np.int64)
        self.pro_weight = np.zeros(bins, np.float64)  # sum of 1 / region area; divided by R at the end
        self.regions = 0
        self.pro_min, self.pro_max = math.inf, -math.inf
        self.map_images = 0

    def add_image(self, score: float, label: int, defect_type: str) -> None:
        if not math.isfinite(score):
            raise DataError(f"image {len(self.scores)}: score is NaN or infinite")
        self.scores.append(float(score))
        self.labels.append(1 if label else 0)
        self.type_ids.append(self.types.setdefault(defect_type, len(self.types)))

    def add_maps(self, mask: np.ndarray, pixel_map: np.ndarray, pro_map: np.ndarray) -> None:
        """One image's ground truth (non-zero = defect) with its "add" and "mul" maps (same shape)."""
        from skimage.measure import label  # imported lazily: skimage is slow to import

        mask = np.asarray(mask) != 0
        if mask.shape != pixel_map.shape or mask.shape != pro_map.shape:
            raise DataError(
                f"image {self.map_images}: mask {mask.shape} and maps "
                f"{pixel_map.shape}, {pro_map.shape} differ"
            )
        if not (np.isfinite(pixel_map).all() and np.isfinite(pro_map).all()):
            raise DataError(f"image {self.map_images}: map contains NaN or infinity")
        pos, neg = self.pixel_bins.joint_counts(pixel_map, mask)
        self.pix_pos += pos
        self.pix_neg += neg
        self.pro_neg += self.pro_bins.joint_counts(pro_map, mask)[1]
        if mask.any():
            regions, n = label(mask, connectivity=2, return_num=True)  # 8-connected components
            inside = regions[mask]
            area = np.bincount(inside, minlength=n + 1)
            idx = self.pro_bins.index(pro_map[mask])
            self.pro_weight += np.bincount(idx, weights=1.0 / area[inside], minlength=self.pro_bins.bins)
            self.regions += n
        self.pro_min = min(self.pro_min, float(pro_map.min()))
        self.pro_max = max(self.pro_max, float(pro_map.max()))
        self.map_images += 1

    # -- merging (data-parallel evaluation: each rank feeds its shard, msflow.train.distributed merges) --
    def histograms(self) -> list[np.ndarray]:
        """The per-bin state, merged by summation: pixel positives, negatives (int64), PRO negatives
        (int64), PRO weights (float64). Integer sums are exact in any order; the float64 weights are sums
        of 1 / region area, so a different grouping can change their last bit only."""
        return [self.pix_pos, self.pix_neg, self.pro_neg, self.pro_weight]

    def add_histograms(self, histograms: list[np.ndarray]) -> None:
        add_histograms(self.histograms(), histograms)

    def image_state(self) -> dict[str, Any]:
        """Everything but the histograms, as plain values (small: O(images) floats, picklable)."""
        names = {i: t for t, i in self.types.items()}
        return {
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "types": [names[i] for i in self.type_ids],
            "regions": self.regions,
            "pro_min": self.pro_min,
            "pro_max": self.pro_max,
            "map_images": self.map_images,
        }

    def add_image_state(self, state: dict[str, Any]) -> None:
        """Append another accumulator's images (from :meth:`image_state`) after this one's."""
        for score, label, defect_type in zip(state["scores"], state["labels"], state["types"], strict=True):
            self.add_image(score, label, defect_type)
        self.regions += int(state["regions"])
        self.pro_min = min(self.pro_min, float(state["pro_min"]))
        self.pro_max = max(self.pro_max, float(state["pro_max"]))
        self.map_images += int(state["map_images"])

    def empty_copy(self) -> StreamingMetrics:
        """A fresh accumulator with the same settings (bins, ranges, AUPRO mode)."""
        p, q = self.pixel_bins, self.pro_bins
        return StreamingMetrics((p.lo, p.hi), (q.lo, q.hi), p.bins, self.pro_mode, self.fpr_limit)

    def _settings(self) -> tuple:
        p, q = self.pixel_bins, self.pro_bins
        return (p.lo, p.hi, p.bins, q.lo, q.hi, q.bins, self.pro_mode, self.fpr_limit)

    def merge(self, other: StreamingMetrics) -> None:
        """Add ``other``'s images after this one's: the same state as one accumulator fed this one's
        images, then ``other``'s (up to the last bit of the float64 PRO weights, see :meth:`histograms`)."""
        if self._settings() != other._settings():
            raise DataError("cannot merge streaming metrics with different bins, ranges or AUPRO mode")
        self.add_histograms(other.histograms())
        self.add_image_state(other.image_state())

    def result(self) -> dict[str, Any]:
        """Metrics in percent; those the data cannot give are listed in ``not_available`` with the reason."""
        out: dict[str, Any] = {}
        missing: dict[str, str] = {}
        labels = np.frombuffer(self.labels, dtype=np.int8).astype(np.int64)
        scores = np.frombuffer(self.scores, dtype=np.float64)
        n_bad = int(labels.sum())
        n_good = labels.size - n_bad
        if n_bad and n_good:
            names = {i: t for t, i in self.types.items()}
            types = [names[i] for i in self.type_ids]
            out["image_auroc"] = image_auroc(labels, scores)
            out["image_f1_max"], out["image_f1_threshold"] = f1_max(labels, scores)
            out["per_defect_type"] = per_defect_type(labels, scores, types)
        else:
            why = f"needs good and defective test images, got {n_good} good and {n_bad} defective"
            missing.update(image_auroc=why, image_f1_max=why, per_defect_type=why)
        if self.map_images:
            p, n = int(self.pix_pos.sum()), int(self.pix_neg.sum())
            if p and n:
                auc, bound = auroc_from_histograms(self.pix_pos, self.pix_neg)
                out["pixel_auroc"], out["pixel_auroc_error_bound"] = float(auc), float(bound)
                f1, thr, bound = f1_max_from_histograms(self.pix_pos, self.pix_neg, self.pixel_bins)
                out["pixel_f1_max"], out["pixel_f1_threshold"], out["pixel_f1_error_bound"] = f1, thr, bound
                weight = self.pro_weight / self.regions
                if self.pro_mode == "standard":
                    out["aupro"], out["aupro_error_bound"] = aupro_from_histograms(
                        weight, self.pro_neg, self.fpr_limit
                    )
                else:
                    out["aupro"], out["aupro_error_bound"] = official_aupro_from_histograms(
                        weight, self.pro_neg, self.pro_bins, self.pro_min, self.pro_max, self.fpr_limit
                    )
                out["pro_mode"] = self.pro_mode
            else:
                why = f"needs defect and defect-free pixels in the masks, got {p} defect and {n} defect-free"
                missing.update(pixel_auroc=why, pixel_f1_max=why, aupro=why)
        if missing:
            out["not_available"] = missing
        return out
