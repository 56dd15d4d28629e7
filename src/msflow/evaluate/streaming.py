"""Test-set metrics accumulated image by image, in memory that does not grow with the number of images.

Why histograms: the maps have a known range (model/anomaly_map.py: the "add" map in [0, number of
scales], the "mul" map in [0, 1), kept by the bilinear resize to the original size), so every pixel is
counted into one of ``bins`` bins over it and the curves (ROC, PR, PRO) get a point at every bin edge.
Each bin also keeps its smallest and largest value: a bin whose pixels share one value (the clipped zeros
of a "global" map, a saturated plateau) is an exact tie, as the exact metrics see it, and adds no error.
State: a few fixed arrays (8 MiB each at 2^20 bins) plus the O(N) image scores and labels.

Error against the exact computation (evaluate/metrics.py), returned next to each metric
(``*_error_bound``, percent points). Only bins holding more than one distinct value ("open") can err:

* **Pixel AUROC.** Pairs (positive, negative) in different bins are ordered exactly; pairs in one bin
  count as ties (1/2). So |streamed - exact| <= 1/2 * sum_open pos_b * neg_b / (P * N).
* **Pixel F1-max.** Selecting every bin >= b is the exact threshold "score >= smallest value of bin b",
  so the streamed maximum is an exact F1, never above the exact maximum. A threshold inside an open bin
  b selects at most TP(>= b) true and at least FP(> b) false positives, so its F1 is at most
  2 TP(>= b) / (TP(>= b) + FP(> b) + P): the bound is the largest of these over the open bins minus the
  streamed maximum (0 if none is larger).
* **AUPRO, standard mode.** Every bin edge is a point of the exact PRO curve. Both curves are
  non-decreasing, so across an open bin the exact curve stays in the box dFPR_b x dPRO_b and the
  trapezoid over the chord errs by at most half that box; the segment cut at the FPR limit (a fraction
  t of its box's width w) by at most w * t * dPRO_b * (1 - t / 2).
* **AUPRO, official mode** (800 thresholds between the exact min and max, prediction score > θ): a
  threshold inside an open bin splits it linearly (as if spread evenly). The figure reported is the
  largest share of negatives or region weight in such a bin (no closed form survives the official
  min-max rescaling of the FPR axis); a refinement puts every threshold on a bin edge: exact (0).

**Refinement** (:meth:`StreamingMetrics.refined`): when a bound is above ``BOUND_TARGET`` (0.1 points),
the open bins that carry the error are split between their smallest and largest value and the maps are
streamed again into the finer bins (by :func:`msflow.evaluate.evaluation.evaluate_stream` when it can
get the maps a second time). Memory stays that of the bins, ``MAX_BINS`` at most. AUPRO's region
weights (:func:`metrics.region_weights`) are histogrammed like the counts.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Protocol

import numpy as np

from msflow.errors import DataError
from msflow.evaluate import metrics as exact

DEFAULT_BINS = 2**20
MAX_BINS = 2**21  # per map, after refinement (5 arrays of 16 MiB each)
BOUND_TARGET = 0.1  # percent points: a refinement pass is worth it above this


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

    def edges(self) -> np.ndarray:
        """All ``bins + 1`` edges (float64)."""
        return self.edge(np.arange(self.bins + 1))


class EdgeBinning(Binning):
    """Bins between given increasing edges (a refinement's uneven bins); values outside go to the end bins."""

    def __init__(self, edges: np.ndarray) -> None:
        self._edges = np.asarray(edges, dtype=np.float64)
        if self._edges.ndim != 1 or self._edges.size < 3 or not (np.diff(self._edges) > 0).all():
            raise DataError(f"bin edges must increase strictly, got {self._edges.size} edges")
        self.lo, self.hi, self.bins = float(self._edges[0]), float(self._edges[-1]), self._edges.size - 1

    def index(self, values: np.ndarray) -> np.ndarray:
        # bin b holds edges[b] <= x < edges[b + 1]: the count of inner edges <= x
        return np.searchsorted(self._edges[1:-1], np.asarray(values, dtype=np.float64), side="right")

    def edge(self, b: int | np.ndarray) -> Any:
        return self._edges[np.asarray(b)]


class BinStats:
    """Per-bin counts of defect and defect-free pixels of one map kind, with each bin's smallest and
    largest value (``low``, ``high``; +inf, -inf while empty)."""

    def __init__(self, binning: Binning) -> None:
        self.binning = binning
        n = binning.bins
        self.pos, self.neg = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.low, self.high = np.full(n, np.inf), np.full(n, -np.inf)
        self.checksum = 0.0  # sums of the values and of the defect pixels' values: tells maps apart

    def add(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Count one image; returns the bin of each defect pixel (in ``values[mask]`` order). The values
        are sorted once (float32 sorts fast): bins are then runs, whose lengths are the counts and whose
        ends the smallest and largest values, without a scatter over every pixel."""
        xs = np.sort(values, axis=None)
        b = self.binning.index(xs)
        cut = np.flatnonzero(b[1:] != b[:-1]) + 1
        starts, ends = np.concatenate(([0], cut)), np.concatenate((cut, [xs.size]))
        run = b[starts]  # distinct bins, increasing
        self.neg[run] += ends - starts
        self.low[run] = np.minimum(self.low[run], xs[starts])
        self.high[run] = np.maximum(self.high[run], xs[ends - 1])
        self.checksum += float(xs.sum(dtype=np.float64)) + float(values[mask].sum(dtype=np.float64))
        inside = self.binning.index(values[mask])
        hit, count = np.unique(inside, return_counts=True)
        self.pos[hit] += count
        self.neg[hit] -= count
        return inside

    def open_bins(self) -> np.ndarray:
        """True where a bin holds more than one distinct value (only those can make a metric err)."""
        return self.high > self.low


def suffix_sums(counts: np.ndarray) -> np.ndarray:
    """``out[b]`` = sum of counts[b:] (float64; the counts at or above edge b), length bins + 1."""
    return np.concatenate((np.cumsum(counts[::-1], dtype=np.float64)[::-1], [0.0]))


def auroc_from_histograms(
    pos: np.ndarray, neg: np.ndarray, open_bins: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC, error bound) in percent from per-bin positive and negative counts along the last axis
    (leading axes: independent histograms, e.g. bootstrap draws); ``open_bins`` default: all bins."""
    pos64, neg64 = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    pairs = pos64.sum(axis=-1) * neg64.sum(axis=-1)
    below = np.cumsum(neg64, axis=-1) - neg64  # negatives in lower bins
    tied = pos64 * neg64
    auc = ((pos64 * below).sum(axis=-1) + 0.5 * tied.sum(axis=-1)) / pairs
    err = (tied if open_bins is None else tied * open_bins).sum(axis=-1)
    return auc * 100.0, 0.5 * err / pairs * 100.0


def _f1_curves(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1 selecting every bin >= b, the most F1 a threshold inside bin b can reach), per bin."""
    p = float(pos.sum())
    tp, fp = suffix_sums(pos), suffix_sums(neg)
    f1 = 2 * tp[:-1] / (tp[:-1] + fp[:-1] + p)
    inside = 2 * tp[:-1] / (tp[:-1] + fp[1:] + p)  # all of the bin's positives, none of its negatives
    return f1, inside


def f1_max_from_histograms(
    pos: np.ndarray, neg: np.ndarray, binning: Binning, stats: BinStats | None = None
) -> tuple[float, float, float]:
    """(best F1 in percent, its threshold, error bound in percent). The threshold is the best bin's
    smallest value with ``stats`` (as the exact F1's), else its lower edge (and every bin counts as open)."""
    f1, inside = _f1_curves(pos, neg)
    # Edges with equal F1 next to each other select the same pixels (empty bins between): take the
    # highest, the one closest to the lowest selected score (what the exact threshold is).
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    reach = inside if stats is None else inside[stats.open_bins()]
    bound = max(0.0, float(reach.max(initial=0.0)) - float(f1[best]))
    threshold = float(binning.edge(best) if stats is None else stats.low[best])
    return float(f1[best]) * 100.0, threshold, bound * 100.0


def _pro_points(weight: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at the edges from the top bin down, (0, 0) first: point k selects the top k bins."""
    return suffix_sums(neg)[::-1] / float(neg.sum()), suffix_sums(weight)[::-1]


def _pro_segment_errors(
    fpr: np.ndarray, pro: np.ndarray, open_bins: np.ndarray, fpr_limit: float
) -> np.ndarray:
    """Each bin's largest possible error of the trapezoid area below ``fpr_limit`` (unnormalised), in
    bin order; the segment from point k to k + 1 is bin ``bins - 1 - k``."""
    x0, x1, dy = fpr[:-1], fpr[1:], pro[1:] - pro[:-1]
    full = (x1 - x0) * dy / 2.0
    w = np.clip(fpr_limit - x0, 0.0, None)
    t = np.divide(w, x1 - x0, out=np.ones_like(w), where=x1 > x0)
    partial = w * dy * (1.0 - t / 2.0)
    return np.where(x1 <= fpr_limit, full, np.where(x0 < fpr_limit, partial, 0.0))[::-1] * open_bins


def aupro_from_histograms(
    weight: np.ndarray, neg: np.ndarray, open_bins: np.ndarray, fpr_limit: float = 0.3
) -> tuple[float, float]:
    """Standard AUPRO (percent) and its error bound from per-bin PRO ``weight`` (summing to 1) and
    negative counts."""
    fpr, pro = _pro_points(weight, neg)
    bound = float(_pro_segment_errors(fpr, pro, open_bins, fpr_limit).sum())
    return exact.standard_pro_area(fpr, pro, fpr_limit), bound / fpr_limit * 100.0


def official_aupro_from_histograms(
    weight: np.ndarray, stats: BinStats, lo: Any, hi: Any, fpr_limit: float = 0.3
) -> tuple[float, float]:
    """Official MSFlow PRO (percent, see :func:`metrics.aupro`) from the PRO map's ``stats`` and region
    ``weight``, and the largest share of an open bin that a threshold splits (0: exact)."""
    thresholds = exact.official_thresholds(lo, hi)
    neg, binning = stats.neg, stats.binning
    n_neg = float(neg.sum())
    neg_above, w_above = suffix_sums(neg), suffix_sums(weight)
    # Pixels > θ: whole bins above θ's bin, plus the part of θ's bin above θ: all of it when its
    # smallest value is above θ, none when its largest is not, else a linear share (spread evenly).
    b = binning.index(thresholds)
    left = np.maximum(binning.edge(b), stats.low[b])
    right = np.minimum(binning.edge(b + 1), stats.high[b])
    span = np.maximum(right - left, 1e-300)
    frac_above = np.where(thresholds < left, 1.0, np.clip((right - thresholds) / span, 0.0, 1.0))
    split = (thresholds >= left) & (thresholds < right)
    fpr = (neg_above[b + 1] + frac_above * neg[b]) / n_neg
    area = exact.official_pro_area(fpr, w_above[b + 1] + frac_above * weight[b], fpr_limit)
    share = np.maximum(neg[b] / n_neg, weight[b]) * split
    return area, float(share.max(initial=0.0)) * 100.0


class Mergeable(Protocol):
    """An accumulator that the ranks of a data-parallel job feed with their shards and then merge
    (:meth:`msflow.train.distributed.Distributed.merge_to_main`): histograms add (:meth:`add_histograms`,
    inherited), per-image state (``image_state()["scores"]`` and the rest) is appended in rank order."""

    def histograms(self) -> list[np.ndarray]: ...
    def image_state(self) -> dict[str, Any]: ...
    def add_image_state(self, state: dict[str, Any]) -> None: ...
    def empty_copy(self) -> Any: ...

    def add_histograms(self, histograms: list[np.ndarray]) -> None:
        """Add another accumulator's :meth:`histograms`, refusing a shape or dtype mismatch (a cast could
        lose counts)."""
        for mine, theirs in zip(self.histograms(), histograms, strict=True):
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise DataError(
                    f"cannot merge histograms of {theirs.shape} {theirs.dtype} into {mine.shape} {mine.dtype}"
                )
            mine += theirs


def _worst_until(errors: np.ndarray, target: float) -> np.ndarray:
    """Priorities (0 = leave) of the bins to split so that the errors of the bins left sum to at most
    a quarter of ``target``: the largest first; nothing when their sum already meets ``target``."""
    if errors.sum() <= target:
        return np.zeros_like(errors)
    order = np.argsort(errors)  # ascending: the smallest are left alone while they fit
    left = np.cumsum(errors[order]) <= target / 4
    out = errors.copy()
    out[order[left]] = 0.0
    return out


def _split_binning(stats: BinStats, priority: np.ndarray, max_bins: int, extra: np.ndarray) -> EdgeBinning:
    """Finer bins for another pass: empty bins merged away, each bin with ``priority`` > 0 split evenly
    between its smallest and largest value (the highest priorities first while ``max_bins`` allows),
    and the ``extra`` edges added."""
    edges = stats.binning.edges()
    filled = np.flatnonzero(stats.pos + stats.neg)
    kept = np.concatenate(([edges[0]], edges[filled[filled > 0]], [edges[-1]]))
    flagged = np.flatnonzero(priority > 0)
    flagged = flagged[np.argsort(-priority[flagged], kind="stable")]
    room = max_bins - kept.size - extra.size
    parts = [kept, extra]
    if flagged.size and room > flagged.size:
        k = min(4096, room // flagged.size + 1)
        low, high = stats.low[flagged], stats.high[flagged]
        parts.append((low[:, None] + (high - low)[:, None] * (np.arange(1, k) / k)[None, :]).ravel())
    elif flagged.size and room > 0:
        top = flagged[:room]
        parts.append((stats.low[top] + stats.high[top]) / 2)
    return EdgeBinning(np.unique(np.concatenate(parts)))


class StreamingMetrics(Mergeable):
    """All test metrics of :func:`metrics.evaluate`, fed one image at a time: ``pixel_range`` is the
    "add" map's range (0, number of scales), ``pro_range`` the "mul" map's (0, 1); ``bins`` per map
    (2^20: 72 MiB of state in all), or given ``binnings`` (pixel, PRO) (a refinement's, :meth:`refined`)."""

    def __init__(
        self,
        pixel_range: tuple[float, float] = (0.0, 3.0),
        pro_range: tuple[float, float] = (0.0, 1.0),
        bins: int = DEFAULT_BINS,
        pro_mode: str = "standard",
        fpr_limit: float = 0.3,
        binnings: tuple[Binning, Binning] | None = None,
    ) -> None:
        if pro_mode not in ("standard", "official"):
            raise DataError(f"aupro: mode must be 'standard' or 'official', got {pro_mode!r}")
        if binnings is None:
            binnings = (Binning(*pixel_range, bins), Binning(*pro_range, bins))
        self.pixel, self.pro = BinStats(binnings[0]), BinStats(binnings[1])
        self.pro_mode, self.fpr_limit = pro_mode, fpr_limit
        self.scores, self.labels, self.type_ids = array("d"), array("b"), array("i")
        self.types: dict[str, int] = {}
        self.pro_weight = np.zeros(binnings[1].bins, np.float64)  # sum of 1 / region area; / R at the end
        self.regions = 0
        self.pro_dtype = "float64"
        self.map_images = 0
        self.passes = 1

    def add_image(self, score: float, label: int, defect_type: str) -> None:
        if not math.isfinite(score):
            raise DataError(f"image {len(self.scores)}: score is NaN or infinite")
        self.scores.append(float(score))
        self.labels.append(1 if label else 0)
        self.type_ids.append(self.types.setdefault(defect_type, len(self.types)))

    def add_maps(self, mask: np.ndarray, pixel_map: np.ndarray, pro_map: np.ndarray) -> None:
        """One image's ground truth (non-zero = defect) with its "add" and "mul" maps (same shape)."""
        mask = np.asarray(mask) != 0
        if mask.shape != pixel_map.shape or mask.shape != pro_map.shape:
            shapes = f"mask {mask.shape} and maps {pixel_map.shape}, {pro_map.shape}"
            raise DataError(f"image {self.map_images}: {shapes} differ")
        if not (np.isfinite(pixel_map).all() and np.isfinite(pro_map).all()):
            raise DataError(f"image {self.map_images}: map contains NaN or infinity")
        self.pixel.add(pixel_map, mask)
        inside = self.pro.add(pro_map, mask)
        if inside.size:
            weight, n = exact.region_weights(mask)
            hit, where = np.unique(inside, return_inverse=True)
            self.pro_weight[hit] += np.bincount(where, weights=weight[mask])
            self.regions += n
        self.pro_dtype = str(pro_map.dtype)
        self.map_images += 1

    # -- merging (data-parallel evaluation: each rank feeds its shard, msflow.train.distributed merges) --
    def histograms(self) -> list[np.ndarray]:
        """The per-bin state merged by summation (the bins' value ranges merge by min and max, in
        :meth:`image_state`): the int64 counts add exactly in any order, the float64 PRO weights (sums of
        1 / region area) up to their last bit."""
        return [self.pixel.pos, self.pixel.neg, self.pro.neg, self.pro_weight, self.pro.pos]

    def image_state(self) -> dict[str, Any]:
        """Everything but the summed histograms, as plain values (picklable): O(images) floats and the
        bins' value ranges."""
        state = {k: getattr(self, k) for k in ("regions", "pro_dtype", "map_images")}
        return {
            **state,
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "types": self.image_types(),
            "ranges": [(stats.low, stats.high) for stats in (self.pixel, self.pro)],
        }

    def add_image_state(self, state: dict[str, Any]) -> None:
        """Append another accumulator's images (from :meth:`image_state`) after this one's."""
        for score, label, defect_type in zip(state["scores"], state["labels"], state["types"], strict=True):
            self.add_image(score, label, defect_type)
        self.regions += int(state["regions"])
        if state["map_images"]:
            self.pro_dtype = state["pro_dtype"]
        self.map_images += int(state["map_images"])
        for stats, (low, high) in zip((self.pixel, self.pro), state["ranges"], strict=True):
            np.minimum(stats.low, low, out=stats.low)
            np.maximum(stats.high, high, out=stats.high)

    def empty_copy(self) -> StreamingMetrics:
        """A fresh accumulator with the same settings (bins, ranges, AUPRO mode)."""
        binnings = (self.pixel.binning, self.pro.binning)
        return StreamingMetrics(pro_mode=self.pro_mode, fpr_limit=self.fpr_limit, binnings=binnings)

    def _settings(self) -> tuple:
        edges = [stats.binning.edges().tobytes() for stats in (self.pixel, self.pro)]
        return (*edges, self.pro_mode, self.fpr_limit)

    def merge(self, other: StreamingMetrics) -> None:
        """Add ``other``'s images after this one's: the same state as one accumulator fed this one's
        images, then ``other``'s (up to the last bit of the float64 PRO weights, see :meth:`histograms`)."""
        if self._settings() != other._settings():
            raise DataError("cannot merge streaming metrics with different bins, ranges or AUPRO mode")
        self.add_histograms(other.histograms())
        self.add_image_state(other.image_state())

    # -- results ----------------------------------------------------------------------------------
    def image_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The image scores (float64) and labels (int64, 1 = defect), in image order."""
        labels = np.frombuffer(self.labels, dtype=np.int8).astype(np.int64)
        return np.frombuffer(self.scores, dtype=np.float64), labels

    def image_types(self) -> list[str]:
        """Each image's defect type, in image order."""
        names = {i: t for t, i in self.types.items()}
        return [names[i] for i in self.type_ids]

    def image_metrics(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Image AUROC, F1-max and per-defect-type AUROC (exact), and the reasons for those missing."""
        scores, labels = self.image_arrays()
        n_bad = int(labels.sum())
        n_good = labels.size - n_bad
        if not (n_bad and n_good):
            why = f"needs good and defective test images, got {n_good} good and {n_bad} defective"
            return {}, {"image_auroc": why, "image_f1_max": why, "per_defect_type": why}
        return exact.image_metrics(labels, scores, self.image_types()), {}

    def pixel_metrics(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Pixel AUROC, F1-max and AUPRO with their error bounds, and the reasons for those missing."""
        if not self.map_images:
            return {}, {}
        p, n = int(self.pixel.pos.sum()), int(self.pixel.neg.sum())
        if not (p and n):
            why = f"needs defect and defect-free pixels in the masks, got {p} defect and {n} defect-free"
            return {}, {"pixel_auroc": why, "pixel_f1_max": why, "aupro": why}
        px, out = self.pixel, {}
        auc, bound = auroc_from_histograms(px.pos, px.neg, px.open_bins())
        out["pixel_auroc"], out["pixel_auroc_error_bound"] = float(auc), float(bound)
        f1, thr, bound = f1_max_from_histograms(px.pos, px.neg, px.binning, px)
        out["pixel_f1_max"], out["pixel_f1_threshold"], out["pixel_f1_error_bound"] = f1, thr, bound
        weight = self.pro_weight / self.regions
        if self.pro_mode == "standard":
            aupro = aupro_from_histograms(weight, self.pro.neg, self.pro.open_bins(), self.fpr_limit)
        else:
            aupro = official_aupro_from_histograms(weight, self.pro, *self._pro_extremes(), self.fpr_limit)
        out["aupro"], out["aupro_error_bound"] = aupro
        out.update(pro_mode=self.pro_mode, metric_passes=self.passes)
        return out, {}

    def _pro_extremes(self) -> tuple[Any, Any]:
        """The PRO maps' min and max (the extreme bins' smallest and largest value) in their own dtype,
        so the official thresholds are the exact ones."""
        kind = np.dtype(self.pro_dtype).type
        return kind(self.pro.low.min()), kind(self.pro.high.max())

    def result(self) -> dict[str, Any]:
        """Metrics in percent; those the data cannot give are listed in ``not_available`` with the reason."""
        (out, missing), (pixel, missing_pixel) = self.image_metrics(), self.pixel_metrics()
        out, missing = {**out, **pixel}, {**missing, **missing_pixel}
        return {**out, "not_available": missing} if missing else out

    # -- refinement: a second pass over the same maps in finer bins where the error is ----------------
    def bounds(self) -> dict[str, float]:
        """The error bound of each pixel metric (percent points); empty when there are none."""
        pixel, _ = self.pixel_metrics()
        return {k: float(v) for k, v in pixel.items() if k.endswith("_error_bound")}

    def _pixel_priorities(self, target: float) -> np.ndarray:
        """Which pixel-map bins to split (priority > 0) for the pixel AUROC and F1 bounds."""
        px = self.pixel
        is_open = px.open_bins()
        pos, neg = px.pos.astype(np.float64), px.neg.astype(np.float64)
        tied = 50.0 * pos * neg * is_open / (pos.sum() * neg.sum())
        priority = _worst_until(tied, target)
        f1, inside = _f1_curves(px.pos, px.neg)
        excess = np.clip(inside - f1.max(), 0.0, None) * 100.0 * is_open
        if excess.max(initial=0.0) > target:
            priority = np.maximum(priority, np.where(excess > target / 4, excess, 0.0))
        return priority

    def _pro_priorities(self, target: float) -> tuple[np.ndarray, np.ndarray]:
        """Which PRO-map bins to split, and the edges to add (the official thresholds, just above each
        one: a pixel is then above θ exactly when its bin is)."""
        weight, pro = self.pro_weight / self.regions, self.pro
        if self.pro_mode == "official":
            thresholds = exact.official_thresholds(*self._pro_extremes()).astype(np.float64)
            return np.zeros(pro.binning.bins), np.nextafter(thresholds, np.inf)
        fpr, curve = _pro_points(weight, pro.neg)
        errors = _pro_segment_errors(fpr, curve, pro.open_bins(), self.fpr_limit) / self.fpr_limit * 100
        return _worst_until(errors, target), np.zeros(0)

    def refined(self, target: float = BOUND_TARGET, max_bins: int = MAX_BINS) -> StreamingMetrics | None:
        """An empty accumulator with finer bins where this one's bounds exceed ``target``, sharing this
        one's image scores: feed it the same maps again (:meth:`add_maps` only), check it with
        :meth:`check_same_maps`, and take its :meth:`result`. ``None`` when every bound meets ``target``
        (or the data have no pixel metrics)."""
        bounds = self.bounds()
        if not bounds or max(bounds.values()) <= target:
            return None
        pixel = _split_binning(self.pixel, self._pixel_priorities(target), max_bins, np.zeros(0))
        priority, extra = self._pro_priorities(target)
        pro = _split_binning(self.pro, priority, max_bins, extra)
        finer = StreamingMetrics(pro_mode=self.pro_mode, fpr_limit=self.fpr_limit, binnings=(pixel, pro))
        finer.scores, finer.labels = self.scores, self.labels
        finer.type_ids, finer.types = self.type_ids, self.types
        finer.passes = self.passes + 1
        return finer

    def _fingerprint(self) -> tuple[tuple, tuple]:
        """(images, regions, defect and defect-free pixels), (the maps' extremes and checksums)."""
        counts = (self.map_images, self.regions, int(self.pixel.pos.sum()), int(self.pixel.neg.sum()))
        return counts, (*self._pro_extremes(), self.pixel.checksum, self.pro.checksum)

    def check_same_maps(self, first: StreamingMetrics) -> None:
        """Refuse a refinement pass that did not see the maps of the pass it refines (other images, or
        maps that changed between the passes)."""
        seen, before = self._fingerprint(), first._fingerprint()
        if seen != before:
            raise DataError(
                f"the refinement pass saw other maps than the first one (images, regions, defect and "
                f"defect-free pixels: {seen[0]} vs {before[0]}; same map values: {seen[1] == before[1]})"
            )
