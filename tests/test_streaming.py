"""Streaming (histogram) metrics against the exact ones of evaluate/metrics.py, their stated error bounds,
and memory that does not grow with the number of maps."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msflow.errors import DataError
from msflow.evaluate import metrics as exact
from msflow.evaluate.streaming import (
    Binning,
    StreamingMetrics,
    auroc_from_histograms,
    f1_max_from_histograms,
)
from msflow.evaluate.threshold import IMAGE_QUANTILE, PIXEL_QUANTILE, GoodImageCalibration

MAGNETIC_TILE = Path(
    os.environ.get("MSFLOW_MAGNETIC_TILE")
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "magnetic_tile"
)


def _smooth_maps(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model-like maps: a coarse (1/8 size) noisy response to the mask, bilinearly up-sampled."""
    h, w = mask.shape
    small = F.interpolate(
        torch.from_numpy(mask[None, None].astype(np.float32)), size=(h // 8 + 1, w // 8 + 1)
    )
    small = small[0, 0].numpy() * rng.uniform(0.3, 1.2) + rng.normal(0, 0.35, small.shape[-2:])
    up = F.interpolate(torch.from_numpy(small)[None, None], size=(h, w), mode="bilinear", align_corners=False)
    add = np.clip(1.0 + up[0, 0].numpy(), 0.0, 3.0).astype(np.float32)  # the "add" map's range [0, 3]
    mul = (1.0 - np.exp(-add)).astype(np.float32)  # the "mul" map's range [0, 1)
    return add, mul


def _random_set(seed: int, n: int = 16) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Masks with blobs of several sizes (some images defect-free) and their maps, sizes vary."""
    rng = np.random.default_rng(seed)
    masks, adds, muls = [], [], []
    for i in range(n):
        h, w = rng.integers(40, 90, 2)
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(0, 4)) if i % 4 else 0):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            mask[y : y + rng.integers(1, 20), x : x + rng.integers(1, 20)] = True
        add, mul = _smooth_maps(rng, mask)
        masks.append(mask), adds.append(add), muls.append(mul)
    return masks, adds, muls


def _streamed(masks, adds, muls, mode="standard", bins=2**20) -> dict:
    acc = StreamingMetrics(bins=bins, pro_mode=mode)
    for m, a, b in zip(masks, adds, muls, strict=True):
        acc.add_image(float(b.max()), int(m.any()), "defect" if m.any() else "good")
        acc.add_maps(m, a, b)
    return acc.result()


def _exact(masks, adds, muls, mode="standard") -> dict:
    labels = [int(m.any()) for m in masks]
    types = ["defect" if m.any() else "good" for m in masks]
    scores = [float(b.max()) for b in muls]
    return exact.evaluate(labels, scores, types, masks, adds, pro_mode=mode, pro_maps=muls)


@pytest.mark.parametrize("mode", ["standard", "official"])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_metrics_match_exact_within_their_bounds(seed: int, mode: str) -> None:
    masks, adds, muls = _random_set(seed)
    got, ref = _streamed(masks, adds, muls, mode), _exact(masks, adds, muls, mode)
    assert got["image_auroc"] == ref["image_auroc"] and got["per_defect_type"] == ref["per_defect_type"]
    assert abs(got["pixel_auroc"] - ref["pixel_auroc"]) <= got["pixel_auroc_error_bound"] + 1e-9
    assert 0 <= ref["pixel_f1_max"] - got["pixel_f1_max"] <= got["pixel_f1_error_bound"] + 1e-9
    for key in ("pixel_auroc", "pixel_f1_max", "aupro"):
        assert got[key] == pytest.approx(ref[key], abs=0.01), key
    if mode == "standard":
        assert abs(got["aupro"] - ref["aupro"]) <= got["aupro_error_bound"] + 1e-9


def test_coarse_bins_err_but_stay_within_the_stated_bounds() -> None:
    # With 64 bins the histogram really loses information: the bounds must hold and must be needed.
    masks, adds, muls = _random_set(3)
    got, ref = _streamed(masks, adds, muls, bins=64), _exact(masks, adds, muls)
    auroc_err = abs(got["pixel_auroc"] - ref["pixel_auroc"])
    aupro_err = abs(got["aupro"] - ref["aupro"])
    assert 1e-4 < auroc_err <= got["pixel_auroc_error_bound"]
    assert 1e-4 < aupro_err <= got["aupro_error_bound"]
    assert 0 <= ref["pixel_f1_max"] - got["pixel_f1_max"] <= got["pixel_f1_error_bound"]


def test_histogram_auroc_and_f1_on_hand_made_counts() -> None:
    # Positives in bins 2 and 3, negatives in 0 and 2: pairs (2,0),(3,0),(3,2) ordered, (2,2) tied.
    pos, neg = np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0])
    auc, bound = auroc_from_histograms(pos, neg)
    assert auc == pytest.approx((3 + 0.5) / 4 * 100) and bound == pytest.approx(0.5 / 4 * 100)
    # Thresholds at edges 3, 2, 1, 0 give (TP, FP) = (1, 0), (2, 1), (2, 1), (2, 2): F1 = 2/3, 4/5, 4/5,
    # 2/3. Edges 1 and 2 predict the same pixels; the higher one is reported (bin 1 is empty).
    f1, thr, _ = f1_max_from_histograms(pos, neg, Binning(0.0, 4.0, 4))
    assert f1 == pytest.approx(80.0) and thr == pytest.approx(2.0)


def test_tied_scores_count_as_half() -> None:
    masks = [np.array([[1, 0], [0, 0]], bool)]
    maps = [np.full((2, 2), 1.0, np.float32)]
    got = _streamed(masks, maps, [np.full((2, 2), 0.5, np.float32)], bins=16)
    assert got["pixel_auroc"] == pytest.approx(exact.pixel_auroc(masks, maps)) == pytest.approx(50.0)


@pytest.mark.parametrize("n_maps", [20])
def test_accumulator_memory_does_not_grow_with_the_number_of_maps(n_maps: int) -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((128, 128), bool)
    mask[30:50, 60:90] = True
    add, mul = _smooth_maps(rng, mask)

    def peak_after(count: int) -> tuple[int, int]:
        acc = StreamingMetrics(bins=2**16)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(count):
            acc.add_image(float(mul.max()) + i, i % 2, "good" if i % 2 == 0 else "d")
            acc.add_maps(mask if i % 2 else np.zeros_like(mask), add, mul)
        held = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        acc.result()
        return held, peak

    held_small, peak_small = peak_after(n_maps)
    held_big, peak_big = peak_after(10 * n_maps)
    # 180 more maps of 16k pixels (64 KiB each as float32) would add > 11 MiB if anything kept them;
    # what may grow is one score, label and type id per image (8 + 1 + 4 bytes).
    assert held_big - held_small < 180 * 64
    assert peak_big - peak_small < 180 * 64 + 64 * 1024


def test_pixel_threshold_from_histogram_is_the_quantile_to_one_bin() -> None:
    rng = np.random.default_rng(1)
    maps = [rng.uniform(0, 3, (40, 50)).astype(np.float32) ** 2 / 3 for _ in range(6)]
    calib = GoodImageCalibration((0.0, 3.0), bins=2**16)
    for i, m in enumerate(maps):
        calib.add(float(i), m)
    t = calib.threshold()
    pixels = np.concatenate([m.ravel() for m in maps])
    assert t.image == pytest.approx(np.quantile(np.arange(6.0), IMAGE_QUANTILE))
    ref = np.quantile(pixels, PIXEL_QUANTILE)
    assert ref <= t.pixel <= np.sort(pixels)[int(np.ceil(PIXEL_QUANTILE * (pixels.size - 1)))] + 3 / 2**16


def test_magnetic_tile_masks_streamed_match_exact() -> None:
    """Deterministic model-like maps over the real Magnetic Tile masks (original sizes, every 6th
    test image): streamed and exact agree to 0.01 points for pixel AUROC, F1-max and both AUPRO modes."""
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"shared dataset not found at {MAGNETIC_TILE}")
    from msflow.data.datasets import load_dataset
    from msflow.data.images import read_image, read_mask

    _, _, test = load_dataset(str(MAGNETIC_TILE))
    rng = np.random.default_rng(7)
    masks, adds, muls = [], [], []
    for s in test[::6]:
        mask = read_mask(s.mask) if s.mask else np.zeros(read_image(s.image).shape[:2], bool)
        add, mul = _smooth_maps(rng, mask)
        masks.append(mask), adds.append(add), muls.append(mul)
    assert sum(m.any() for m in masks) > 50 and sum(not m.any() for m in masks) > 20
    standard, official = _streamed(masks, adds, muls), _streamed(masks, adds, muls, "official")
    y, s = exact._flat_pixels(masks, adds)
    assert abs(standard["pixel_auroc"] - exact.pixel_auroc(masks, adds)) <= 0.01
    assert abs(standard["pixel_f1_max"] - exact.f1_max(y, s)[0]) <= 0.01
    assert abs(standard["aupro"] - exact.aupro(masks, muls)) <= 0.01
    assert abs(official["aupro"] - exact.aupro(masks, muls, mode="official")) <= 0.01


def _fed(masks, adds, muls, bins=2**12, mode="standard") -> StreamingMetrics:
    acc = StreamingMetrics(bins=bins, pro_mode=mode)
    for m, a, b in zip(masks, adds, muls, strict=True):
        acc.add_image(float(b.max()), int(m.any()), "defect" if m.any() else "good")
        acc.add_maps(m, a, b)
    return acc


@pytest.mark.parametrize("mode", ["standard", "official"])
def test_merged_halves_equal_one_accumulator_fed_everything(mode: str) -> None:
    """What data-parallel evaluation relies on: each rank's shard merged in order = one pass."""
    masks, adds, muls = _random_set(3, n=12)
    whole = _fed(masks, adds, muls, mode=mode)
    # the second half starts with a defective image: its defect-type ids differ, merge must map names
    cut = next(i for i in range(5, 12) if masks[i].any())
    first, second = (
        _fed(masks[:cut], adds[:cut], muls[:cut], mode=mode),
        _fed(masks[cut:], adds[cut:], muls[cut:], mode=mode),
    )
    assert first.types["good"] == 0 and second.types["defect"] == 0  # ids mean different types
    first.merge(second)
    for merged, one in zip(first.histograms()[:3], whole.histograms()[:3], strict=True):
        assert merged.dtype == np.int64 and np.array_equal(merged, one)  # counts: exact
    # PRO weights are float64 sums of 1/area, grouped differently: equal to the last bits
    np.testing.assert_allclose(first.pro_weight, whole.pro_weight, rtol=1e-13, atol=0)
    merged_state, whole_state = first.image_state(), whole.image_state()
    for a, b in zip(merged_state.pop("ranges"), whole_state.pop("ranges"), strict=True):
        assert np.array_equal(a, b)  # each bin's smallest and largest value: exact
    assert merged_state == whole_state  # scores, labels, types, regions, min/max: exact
    got, want = first.result(), whole.result()
    assert got.keys() == want.keys() and got["per_defect_type"] == want["per_defect_type"]
    for key in ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_merging_accumulators_with_different_bins_is_refused() -> None:
    with pytest.raises(DataError, match="different bins"):
        StreamingMetrics(bins=16).merge(StreamingMetrics(bins=32))


def test_merged_good_image_calibrations_give_the_same_threshold() -> None:
    """Data-parallel calibration: each rank's shard of the held-out images, merged on rank 0."""
    rng = np.random.default_rng(5)
    maps = [rng.uniform(0, 3, (20, 30)) for _ in range(7)]
    scores = rng.normal(size=7)
    whole, parts = GoodImageCalibration((0.0, 3.0), bins=256), []
    for s, m in zip(scores, maps, strict=True):
        whole.add(s, m)
    for lo, hi in ((0, 0), (0, 3), (3, 7)):  # an empty shard too (fewer held-out images than ranks)
        parts.append(GoodImageCalibration((0.0, 3.0), bins=256))
        for s, m in zip(scores[lo:hi], maps[lo:hi], strict=True):
            parts[-1].add(s, m)
    merged = parts[0].empty_copy()
    for part in parts:
        merged.add_histograms(part.histograms())
        merged.add_image_state(part.image_state())
    assert np.array_equal(merged.pixels, whole.pixels) and merged.scores == whole.scores
    assert merged.threshold() == whole.threshold()
    with pytest.raises(DataError, match="cannot merge histograms"):
        merged.add_histograms([np.zeros(256, np.float64)])
