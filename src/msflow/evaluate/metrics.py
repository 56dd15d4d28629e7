"""Evaluation metrics for anomaly detection: plain NumPy in, floats out.

Every score is returned in percent (0..100), as the official code multiplies by 100.
Labels and masks use 0 = good, anything else = defect.  Pixel metrics pool the pixels of
all test images, good images included (their masks are all zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

from msflow.config import PRO_MODES
from msflow.errors import DataError

#: Masks/maps: one (N, H, W) array, or a list of 2-D arrays (per-image original sizes).
MapsLike = np.ndarray | Sequence[np.ndarray]

_OFFICIAL_STEPS = 800  # number of threshold steps of the official evaluations.py


def _labels_scores(labels: Any, scores: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, scores) pair: 1-D, same length, non-empty, finite, labels in {0, 1}."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise DataError(f"{what}: labels and scores need equal 1-D shapes, got {y.shape} and {s.shape}")
    if y.size == 0:
        raise DataError(f"{what}: empty input (0 labels)")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(f"{what}: labels must be 0 (good) or 1 (defect), got {y[bad][0]!r}")
    if not np.isfinite(s).all():
        raise DataError(f"{what}: score {int(np.flatnonzero(~np.isfinite(s))[0])} is NaN or infinite")
    return y.astype(bool), s


def _auroc(y: np.ndarray, s: np.ndarray, what: str) -> float:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError(f"{what}: AUROC needs both classes, got {n_pos} defect and {y.size - n_pos} good")
    return float(roc_auc_score(y, s) * 100.0)


def _pairs(masks: MapsLike, maps: MapsLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split masks/maps into per-image 2-D (bool mask, score map) pairs, checking shapes."""
    shapes = [x.shape if isinstance(x, np.ndarray) else f"list of {len(x)}" for x in (masks, maps)]
    if any(isinstance(x, np.ndarray) and x.ndim != 3 for x in (masks, maps)):
        raise DataError(f"masks/maps must be (N, H, W) or lists of 2-D arrays, got {shapes[0]}, {shapes[1]}")
    if len(masks) != len(maps) or len(masks) == 0:
        raise DataError(f"masks ({shapes[0]}) and maps ({shapes[1]}) need the same number (> 0) of images")
    pairs = []
    for i, (m, a) in enumerate(zip(masks, maps, strict=False)):
        m, a = np.asarray(m), np.asarray(a)
        if m.ndim != 2 or m.shape != a.shape:
            raise DataError(f"image {i}: mask shape {m.shape} and map shape {a.shape} differ (or not 2-D)")
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise DataError(f"image {i}: map contains NaN or infinity")
        pairs.append((m != 0, a))
    return pairs


def _flat_pixels(masks: MapsLike, maps: MapsLike) -> tuple[np.ndarray, np.ndarray]:
    pairs = _pairs(masks, maps)  # pooled pixels of all images, in image order
    return np.concatenate([m.ravel() for m, _ in pairs]), np.concatenate([a.ravel() for _, a in pairs])


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC in percent of (N,) labels (1 = defect) and scores (higher = more anomalous)."""
    y, s = _labels_scores(labels, scores, "image_auroc")
    return _auroc(y, s, "image_auroc")


def pair_wins(good: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(n_bad, n_good) matrix: 1 where a defective image scores above a good one, 0.5 for a tie."""
    return (bad[:, None] > good[None, :]) + 0.5 * (bad[:, None] == good[None, :])


def weighted_auroc(
    good: np.ndarray, bad: np.ndarray, good_weights: np.ndarray, bad_weights: np.ndarray
) -> np.ndarray:
    """Image AUROC (%) under each row of weights (how often each image was drawn): a bootstrap's AUROCs.
    ``good_weights`` is (rounds, n_good), ``bad_weights`` (rounds, n_bad); ones give :func:`image_auroc`."""
    wins = bad_weights @ pair_wins(good, bad)  # (rounds, n_good)
    return 100 * (wins * good_weights).sum(-1) / (bad_weights.sum(-1) * good_weights.sum(-1))


def bootstrap_counts(n: int, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, n) float counts: how often each of ``n`` images is drawn in each round of a paired
    bootstrap (every score of an image is resampled with it)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(float)


def auroc_difference_interval(
    a: np.ndarray, b: np.ndarray, labels: np.ndarray, rounds: int = 2000, seed: int = 0
) -> list[float]:
    """Image AUROC(a) - AUROC(b) in points and its 95 % interval, [point, low, high], over a paired
    bootstrap of the images (good and defective ones resampled separately, both scores on each draw)."""
    rng = np.random.default_rng(seed)
    good, bad = labels == 0, labels == 1
    wg, wb = bootstrap_counts(int(good.sum()), rounds, rng), bootstrap_counts(int(bad.sum()), rounds, rng)
    ones = np.ones((1, wg.shape[1])), np.ones((1, wb.shape[1]))
    point = float(weighted_auroc(a[good], a[bad], *ones)[0] - weighted_auroc(b[good], b[bad], *ones)[0])
    draws = weighted_auroc(a[good], a[bad], wg, wb) - weighted_auroc(b[good], b[bad], wg, wb)
    low, high = np.percentile(draws, [2.5, 97.5])
    return [round(point, 2), round(float(low), 2), round(float(high), 2)]


def pixel_auroc(masks: MapsLike, maps: MapsLike) -> float:
    """Pixel-level AUROC in percent over the pooled pixels of all images; ``masks`` (N, H, W) or a list
    of 2-D ground truths (non-zero = defect), ``maps`` of the same shape(s)."""
    y, s = _flat_pixels(masks, maps)
    return _auroc(y, s, "pixel_auroc")


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1 in percent, its threshold) over the precision-recall curve, prediction = score >=
    threshold. For pixel level pass the flattened masks (any non-zero = 1) and maps."""
    y, s = _labels_scores(labels, scores, "f1_max")
    if not y.any():
        raise DataError("f1_max: no defect labels, F1 is undefined")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last PR point (P=1, R=0) has no threshold; drop it.  0/0 happens only when P=R=0.
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = int(np.argmax(f1))
    return float(f1[best] * 100.0), float(thresholds[best])


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Each pixel's 1 / (area of its 8-connected defect region), 0 outside the regions, and the number
    of regions: divided by the regions of all images, the weights of the pixels predicted defective sum
    to the mean per-region overlap (PRO)."""
    from skimage.measure import label  # imported lazily: skimage is slow to import

    regions, n = label(mask, connectivity=2, return_num=True)
    inv_area = np.zeros(n + 1)
    inv_area[1:] = 1.0 / np.bincount(regions.ravel(), minlength=n + 1)[1:]
    return inv_area[regions], n  # label 0 (background) gets weight 0


def _sorted_pixels(masks: MapsLike, maps: MapsLike, fpr_limit: float) -> tuple[np.ndarray, ...]:
    """Every threshold selects a prefix of the pixels sorted by descending score, so prefix sums of the
    negatives and PRO weights (:func:`region_weights`) give FPR and PRO at all of them at once; only the
    top pixels needed to pass FPR = ``fpr_limit`` are sorted. Returns the kept scores sorted (P values),
    cumulative negatives and PRO (length P + 1, entry ``c``: the top ``c`` pixels), the number of
    negatives and the minimum score."""
    scores, neg, weights, n_regions = [], [], [], 0
    for m, a in _pairs(masks, maps):
        weight, n = region_weights(m)
        scores.append(a.ravel())
        neg.append(~m.ravel())
        weights.append(weight.ravel())
        n_regions += n
    if n_regions == 0:
        raise DataError("aupro: the masks contain no defect region (all masks are empty)")
    s, is_neg, w = np.concatenate(scores), np.concatenate(neg), np.concatenate(weights)
    n_neg, lo = int(is_neg.sum()), s.min()
    if n_neg == 0:
        raise DataError("aupro: every pixel is a defect, the false positive rate is undefined")
    # Keep pixels scoring >= tau, the n_cut-th highest negative score: at tau the FPR is already
    # >= n_cut / n_neg > fpr_limit (+2, not +1, is a margin against rounding of the product).
    n_cut = int(np.floor(fpr_limit * n_neg)) + 2
    if n_cut <= n_neg:
        tau = np.partition(s[is_neg], n_neg - n_cut)[n_neg - n_cut]  # O(P), no full sort
        top = s >= tau
        s, is_neg, w = s[top], is_neg[top], w[top]
    order = np.argsort(s)[::-1]  # the O(P log P) step; everything else is linear
    cum_neg = np.concatenate(([0], np.cumsum(is_neg[order])))
    cum_pro = np.concatenate(([0.0], np.cumsum(w[order]) / n_regions))
    return s[order], cum_neg, cum_pro, n_neg, lo


def aupro(
    masks: MapsLike,
    maps: MapsLike,
    fpr_limit: float = 0.3,
    mode: str = "standard",
    max_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, in percent.

    PRO(θ) is the mean, over the regions of all images (:func:`region_weights`), of the fraction of
    region pixels predicted defective; FPR(θ) the fraction of all GT-negative pixels predicted defective.
    ``mode="standard"`` (MVTec AD / anomalib): prediction = score >= θ at every distinct score (exact
    curve; with ``max_thresholds``, about that many at score quantiles: approximate, faster), integrated
    as :func:`standard_pro_area`. ``mode="official"`` (the official evaluations.py): score > θ at
    :func:`official_thresholds`, integrated as :func:`official_pro_area`; not comparable with the
    standard number (docs/official-code-differences.md, B17). Masks and maps as :func:`pixel_auroc`'s.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    if mode not in PRO_MODES:
        raise DataError(f"aupro: mode must be one of {list(PRO_MODES)}, got {mode!r}")
    if max_thresholds is not None and (mode != "standard" or max_thresholds < 2):
        raise DataError(f"aupro: max_thresholds={max_thresholds} needs mode='standard' and >= 2")
    s, cum_neg, cum_pro, n_neg, lo = _sorted_pixels(masks, maps, fpr_limit)
    if mode == "official":
        # Pixels with score > θ: that prefix of the descending sort. For θ below the kept pixels it is
        # capped at all of them, whose FPR already exceeds fpr_limit, so such θ are still dropped.
        count = s.size - np.searchsorted(s[::-1], official_thresholds(lo, s[0]), side="right")
        return official_pro_area(cum_neg[count] / n_neg, cum_pro[count], fpr_limit)
    # Threshold θ = s[i] selects every pixel up to the LAST pixel with score s[i] (ties are
    # predicted together), so keep only the last index of each run of equal scores.
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    if max_thresholds is not None and ends.size > max_thresholds:
        # Score quantiles: evenly spaced ranks of the kept pixels, moved to their tie run's end.
        ranks = np.linspace(0, s.size - 1, max_thresholds).round().astype(np.int64)
        ends = np.unique(ends[np.searchsorted(ends, ranks)])
    fpr = np.concatenate(([0.0], cum_neg[ends + 1] / n_neg))
    return standard_pro_area(fpr, np.concatenate(([0.0], cum_pro[ends + 1])), fpr_limit)


def standard_pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Standard AUPRO in percent: the trapezoid area under the PRO curve (non-decreasing, from (0, 0))
    up to ``fpr_limit``, its end point linearly interpolated, divided by ``fpr_limit``."""
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[k - 1] + t * (pro[k] - pro[k - 1]))
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0  # trapezoid rule
    return float(area / fpr_limit * 100.0)


def official_thresholds(lo: Any, hi: Any) -> np.ndarray:
    """The official evaluation's 800 thresholds: the same expression (and dtype, that of ``lo`` and
    ``hi``) as the official code; a float arange may give 801 values."""
    if hi == lo:
        raise DataError(f"aupro(official): all map values equal {lo}, no thresholds can be built")
    return np.arange(lo, hi, (hi - lo) / _OFFICIAL_STEPS)


def official_pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Official MSFlow PRO in percent from the FPR and PRO at its thresholds: those with FPR <
    ``fpr_limit`` are kept, their FPRs min-max rescaled to [0, 1], and the area taken with ``auc``."""
    keep = fpr < fpr_limit
    f = fpr[keep]
    if np.unique(f).size < 2:  # the min-max rescaling below would divide by zero
        raise DataError(f"aupro(official): need 2 distinct FPRs < {fpr_limit}, got {np.unique(f).tolist()}")
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pro[keep]) * 100.0)


def per_defect_type(labels: Any, scores: Any, defect_types: Sequence[str]) -> dict[str, float]:
    """``{type: image AUROC in percent}`` of each defect type (sorted by name) against all "good"
    images; the types must agree with the labels."""
    y, s = _labels_scores(labels, scores, "per_defect_type")
    types = np.asarray(list(defect_types), dtype=object)
    if types.shape != y.shape:
        raise DataError(f"per_defect_type: {types.shape[0]} defect types for {y.shape[0]} labels")
    is_good = types == "good"
    mismatch = np.flatnonzero(is_good == y)
    if mismatch.size:
        i = int(mismatch[0])
        raise DataError(f"per_defect_type: image {i} has type {types[i]!r} but label {int(y[i])}")
    if not is_good.any():
        raise DataError("per_defect_type: no 'good' images to compare against")
    chosen = {str(t): is_good | (types == t) for t in sorted(set(types[~is_good]))}
    return {t: _auroc(y[sel], s[sel], f"per_defect_type[{t}]") for t, sel in chosen.items()}


def evaluate(
    labels: Any,
    scores: Any,
    defect_types: Sequence[str],
    masks: MapsLike | None = None,
    maps: MapsLike | None = None,
    pro_mode: str = "standard",
    pro_maps: MapsLike | None = None,
) -> dict[str, Any]:
    """All metrics of one test set: ``image_auroc``, ``image_f1_max`` (+ threshold),
    ``per_defect_type``, and with masks ``pixel_auroc``, ``pixel_f1_max`` (+ threshold) and ``aupro``
    (``pro_mode``, on ``pro_maps`` if given); masks and maps as :func:`pixel_auroc`'s."""
    out = image_metrics(labels, scores, defect_types)
    if masks is not None:
        if maps is None:
            raise DataError("evaluate: masks were given but maps are None")
        if len(masks) != np.size(labels):
            raise DataError(f"evaluate: {len(masks)} masks for {np.size(labels)} image labels")
        y, s = _flat_pixels(masks, maps)
        out["pixel_auroc"] = _auroc(y, s, "pixel_auroc")
        out["pixel_f1_max"], out["pixel_f1_threshold"] = f1_max(y, s)
        # The official code scores PRO on the "mul" map, pixel AUROC on the "add" map.
        out["aupro"] = aupro(masks, maps if pro_maps is None else pro_maps, mode=pro_mode)
    return out


def image_metrics(labels: Any, scores: Any, defect_types: Sequence[str]) -> dict[str, Any]:
    """``image_auroc``, ``image_f1_max`` (+ threshold) and ``per_defect_type``, all in percent."""
    out: dict[str, Any] = {"image_auroc": image_auroc(labels, scores)}
    out["image_f1_max"], out["image_f1_threshold"] = f1_max(labels, scores)
    out["per_defect_type"] = per_defect_type(labels, scores, defect_types)
    return out
