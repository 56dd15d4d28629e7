"""Tests for msflow.metrics: hand-computed cases and a slow reference for AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from msflow.errors import DataError
from msflow.evaluate.metrics import aupro, evaluate, f1_max, image_auroc, per_defect_type, pixel_auroc

try:
    from aupro_reference import aupro_official_reference, aupro_standard_reference
except ImportError:  # tests/ became a package: pytest then imports it as tests.test_metrics
    from .aupro_reference import aupro_official_reference, aupro_standard_reference


# --------------------------------------------------------------------------- AUROC / F1


def test_image_auroc_perfect_inverted_ties():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(100.0)
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)


def test_pixel_auroc_hand_computed():
    masks = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]]])
    maps = np.array([[[0.9, 0.1], [0.5, 0.4]], [[0.2, 0.4], [0.6, 0.0]]])
    # Positives {0.9, 0.4}, negatives {0.1, 0.5, 0.2, 0.4, 0.6, 0.0}: 0.9 beats all 6;
    # 0.4 beats 0.1, 0.2, 0.0 and ties 0.4 (counts 1/2) -> (6 + 3.5) / 12 pairs.
    assert pixel_auroc(masks, maps) == pytest.approx(9.5 / 12 * 100)
    # Any non-zero mask value is a defect.
    assert pixel_auroc(masks * 255, maps) == pytest.approx(9.5 / 12 * 100)


def test_f1_max_hand_computed():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.7, 0.9]
    # Score >= 0.8 gives TP=2, FP=0, FN=1: P=1, R=2/3, F1=0.8 (the best; >=0.35 gives 0.75).
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(80.0)
    assert threshold == pytest.approx(0.8)


def test_per_defect_type_and_evaluate():
    types = ["good", "good", "scratch", "scratch", "hole"]
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.3, 0.05]
    # scratch {0.9, 0.3} vs good {0.1, 0.5}: 3 of 4 pairs; hole 0.05 is below both goods.
    assert per_defect_type(labels, scores, types) == pytest.approx({"hole": 0.0, "scratch": 75.0})

    no_gt = evaluate(labels, scores, types)
    assert set(no_gt) == {"image_auroc", "image_f1_max", "image_f1_threshold", "per_defect_type"}

    rng = np.random.default_rng(0)
    masks = [np.zeros((6, 8)), np.zeros((5, 5)), np.zeros((7, 4)), np.zeros((6, 6)), np.zeros((4, 9))]
    for m in masks[2:]:
        m[1:3, 1:3] = 1
    maps = [rng.random(m.shape) + m for m in masks]  # per-image sizes, defects score higher
    res = evaluate(labels, scores, types, masks, maps, pro_mode="standard")
    assert res["image_auroc"] == pytest.approx(50.0)
    assert res["pixel_auroc"] == pytest.approx(100.0)
    assert res["aupro"] == pytest.approx(100.0)
    assert res["per_defect_type"]["scratch"] == pytest.approx(75.0)
    assert 0 < res["pixel_f1_max"] <= 100


# --------------------------------------------------------------------------- AUPRO by hand


def _image(region_score: float, n_high: int, n_tied: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """10x10 image, one 2x2 region (96 negatives); ``n_high`` negatives score 0.9,
    ``n_tied`` negatives share the region score 0.5, the rest score 0.1."""
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[4:6, 4:6] = 1
    neg_scores = np.full(96, 0.1)
    neg_scores[:n_high] = 0.9
    neg_scores[n_high : n_high + n_tied] = 0.5
    amap = np.zeros((10, 10))
    amap[mask == 0] = neg_scores
    amap[mask == 1] = region_score
    return mask, amap


def test_aupro_region_found_before_any_false_positive_is_100():
    rng = np.random.default_rng(1)
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:4, 5:7] = 1
    amap = np.where(mask == 1, 1.0, rng.random((10, 10)) * 0.5)
    assert aupro(mask[None], amap[None]) == pytest.approx(100.0)
    assert aupro(mask[None], amap[None], mode="official") == pytest.approx(100.0)


def test_aupro_region_found_at_known_fpr():
    # 24 of 96 negatives outscore the region: PRO jumps 0 -> 1 at FPR 0.25, so the area up to
    # 0.3 is 0.05 (rectangle), normalised by 0.3.
    mask, amap = _image(region_score=0.5, n_high=24)
    assert aupro(mask[None], amap[None]) == pytest.approx(0.05 / 0.3 * 100)
    # Same FPR with the high negatives in a defect-free 4x8 image instead: 32 / (96 + 32) = 0.25.
    mask2, amap2 = _image(region_score=0.5, n_high=0)
    empty = np.zeros((4, 8))
    assert aupro([mask2, empty], [amap2, np.full((4, 8), 0.9)]) == pytest.approx(0.05 / 0.3 * 100)


def test_aupro_ties_interpolate_end_point():
    # 48 negatives tie with the region: one threshold takes the curve from (0,0) to (0.5,1);
    # at FPR 0.3 PRO is 0.6, area = 0.3 * 0.6 / 2.
    mask, amap = _image(region_score=0.5, n_high=0, n_tied=48)
    assert aupro(mask[None], amap[None]) == pytest.approx(0.09 / 0.3 * 100)
    assert aupro(mask[None], amap[None], fpr_limit=1.0) == pytest.approx((0.25 + 0.5) * 100)


def test_aupro_is_mean_over_regions_with_8_connectivity():
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 1  # diagonal neighbours: ONE region with 8-connectivity
    mask[8:11, 8:11] = 1  # a second region of 9 pixels
    amap = np.linspace(0.3, 0.8, 144).reshape(12, 12)  # negatives strictly inside (0.3, 0.8)
    amap[1, 1] = 0.95  # half of region 1 found before any false positive
    amap[2, 2] = 0.0
    amap[8:11, 8:11] = 0.0  # region 2 only found at FPR 1
    # PRO = (1/2 + 0) / 2 = 0.25 from FPR 0 up to FPR 1 (4-connectivity would give 1/3,
    # pixel weighting 1/11).
    assert aupro(mask[None], amap[None]) == pytest.approx(25.0)


def test_aupro_official_hand_computed():
    # One 10-pixel region (top row), 90 negatives; integer scores 0..800, so the official
    # thresholds are exactly 0, 1, ..., 799 and prediction is score > θ.
    amap = np.zeros((10, 10))
    amap[0, :5], amap[0, 5:] = 800, 650
    amap.ravel()[10:19] = 700  # 9 negatives: FPR 0.1
    amap.ravel()[19:37] = 600  # 18 more: FPR 0.3
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0] = 1
    # θ in [700, 800): (FPR 0, PRO 0.5); [650, 700): (0.1, 0.5); [600, 650): (0.1, 1);
    # below 600 FPR = 0.3 is NOT < 0.3 and dropped.  Rescaled FPR {0, 1}: area 0.5.
    assert aupro(mask[None], amap[None], mode="official") == pytest.approx(50.0)
    # Standard: (0,0) (0,.5) (.1,.5) (.1,1) (.3,1) -> (0.1 * 0.5 + 0.2 * 1) / 0.3.
    assert aupro(mask[None], amap[None]) == pytest.approx(0.25 / 0.3 * 100)


# --------------------------------------------------------------------------- AUPRO vs reference


def _random_case(seed: int, n: int = 4, size: int = 16, ties: bool = False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n - 1):  # the last image stays defect-free
        noise = gaussian_filter(rng.standard_normal((size, size)), sigma=1.5)
        masks[i] = noise > np.quantile(noise, 0.85)  # a few random blobs
    maps = masks * rng.uniform(0.2, 1.0) + rng.random((n, size, size))
    maps = gaussian_filter(maps, sigma=(0, 1, 1)).astype(np.float32)
    if ties:
        maps = np.round(maps, 1)
    return masks, maps


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True), (3, True)])
def test_aupro_standard_matches_reference(seed, ties):
    masks, maps = _random_case(seed, ties=ties)
    for limit in (0.05, 0.3, 1.0):
        expected = aupro_standard_reference(masks, maps, fpr_limit=limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_standard_list_of_sizes_matches_reference():
    masks, maps = [], []
    for seed, (h, w) in enumerate([(12, 16), (20, 9), (15, 15)]):
        m, a = _random_case(seed + 10, n=2, size=max(h, w))
        masks.append(m[0, :h, :w])
        maps.append(a[0, :h, :w])
    assert aupro(masks, maps) == pytest.approx(aupro_standard_reference(masks, maps), abs=1e-6)


@pytest.mark.parametrize(
    "seed, ties, dtype", [(4, False, np.float32), (5, False, np.float64), (6, True, np.float32)]
)
def test_aupro_official_matches_reference(seed, ties, dtype):
    masks, maps = _random_case(seed, ties=ties)
    maps = maps.astype(dtype)
    expected = aupro_official_reference(masks, maps)
    assert aupro(masks, maps, mode="official") == pytest.approx(expected, abs=1e-6)


def test_aupro_official_thresholds_equal_to_scores_match_reference():
    # Integer scores 0..800: every official threshold equals some pixel score, so
    # "score > θ" versus ">=" matters.
    # The two top pixels are negatives scoring 800 and 799: only "score > 799" gives the
    # smallest kept FPR 1/n_neg, which sets the min-max rescaling.
    masks, maps = _random_case(8)
    maps = np.round((maps - maps.min()) / (maps.max() - maps.min()) * 700)
    maps[-1, 0, :2] = 800, 799  # the last image is defect-free
    expected = aupro_official_reference(masks, maps)
    assert aupro(masks, maps, mode="official") == pytest.approx(expected, abs=1e-6)


def test_aupro_max_thresholds():
    masks, maps = _random_case(7, size=24)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, max_thresholds=10**6) == pytest.approx(exact, abs=1e-9)
    assert aupro(masks, maps, max_thresholds=200) == pytest.approx(exact, abs=2.0)


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_raises_with_shapes():
    with pytest.raises(DataError, match=r"\(2, 3\).*\(3, 3\)"):
        pixel_auroc([np.zeros((2, 3))], [np.zeros((3, 3))])
    with pytest.raises(DataError, match="shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(DataError, match="shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError, match="both classes"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="empty"):
        image_auroc([], [])
    with pytest.raises(DataError, match="2"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="no defect region"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    mask, amap = _image(0.5, 24)
    with pytest.raises(DataError, match="max_thresholds"):
        aupro(mask[None], amap[None], mode="official", max_thresholds=100)
    with pytest.raises(DataError, match="mode"):
        aupro(mask[None], amap[None], mode="fast")
    with pytest.raises(DataError, match="good"):
        per_defect_type([1, 1], [0.1, 0.2], ["hole", "hole"])
    with pytest.raises(DataError, match="label"):
        per_defect_type([0, 0, 1], [0.1, 0.2, 0.3], ["good", "hole", "hole"])


def test_auroc_difference_interval_is_the_auroc_difference_with_its_bootstrap() -> None:
    from msflow.evaluate.metrics import auroc_difference_interval

    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    a, b = rng.normal(size=50) + labels, rng.normal(size=50) + 0.3 * labels
    point, low, high = auroc_difference_interval(a, b, labels, rounds=500)
    assert point == pytest.approx(image_auroc(labels, a) - image_auroc(labels, b), abs=0.01)
    assert low < point < high
    assert auroc_difference_interval(a, a.copy(), labels, rounds=50) == [0.0, 0.0, 0.0]
