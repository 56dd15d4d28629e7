"""Choosing the maps' normalisation and smoothing on synthetic defects (msflow.train.map_selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from msflow.evaluate.streaming import auroc_from_histograms
from msflow.model.anomaly_map import AnomalyMapper
from msflow.scoring import map_candidates as candidates
from msflow.train.map_selection import INCUMBENT, bootstrap_pixel_aurocs, choose_maps
from msflow.train.synthetic_check import SyntheticCheck


def test_candidates_cover_what_is_left_to_auto() -> None:
    assert len(candidates("auto", "auto")) == 8 and candidates("auto", "auto")[0] == INCUMBENT
    assert candidates("global", "auto") == [("global", s) for s in (0.0, 2.0, 4.0, 8.0)]
    assert candidates("per_image", 3) == [("per_image", 3.0)]


def test_histogram_auroc_is_sklearns_and_a_bootstrap_weight_duplicates_an_image() -> None:
    rng = np.random.default_rng(0)
    bins = 50
    images = [(rng.integers(0, bins, 30), rng.random(30) < 0.3) for _ in range(4)]  # bin index, positive

    def hist(values: np.ndarray) -> np.ndarray:
        return np.bincount(values, minlength=bins).astype(float)

    pos = np.stack([hist(v[m]) for v, m in images])
    neg = np.stack([hist(v[~m]) for v, m in images])
    values = np.concatenate([v for v, _ in images])
    labels = np.concatenate([m for _, m in images])
    ours = auroc_from_histograms(pos.sum(0), neg.sum(0))[0]
    assert ours == pytest.approx(100 * roc_auc_score(labels, values), abs=1e-9)  # ties count 1/2 in both
    # Source image 0 (its good image has no pixels here; copies 0, 1) drawn twice, 1 (copies 2, 3) once.
    no_good = np.zeros((2, bins))
    weighted = bootstrap_pixel_aurocs((pos, neg, no_good), np.array([[2.0, 1.0]]), per_image=2)[0]
    dup = images[0:2] * 2 + images[2:4]
    values = np.concatenate([v for v, _ in dup])
    labels = np.concatenate([m for _, m in dup])
    assert weighted == pytest.approx(100 * roc_auc_score(labels, values), abs=1e-9)


class _Model:
    """What choose_maps reads of a model: its anomaly mapper (3 scales, global references calibrated)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.anomaly = AnomalyMapper(3, size)
        self.anomaly.ref_add.fill_(-0.5)
        self.anomaly.ref_mul.fill_(-1.5)


def _check(n: int, defect: float, seed: int = 0) -> tuple[SyntheticCheck, _Model]:
    """Per-scale log-likelihood maps whose good pixels are noisy, with a 6 x 6 defect in each copy that
    is only ``defect`` lower: a single pixel hardly tells it from noise, its neighbourhood does."""
    g = torch.Generator().manual_seed(seed)
    size = (32, 48)

    def maps(count: int) -> torch.Tensor:
        return -0.5 * torch.randn(count, *size, generator=g).pow(2)

    good = [maps(n) for _ in range(3)]
    bad = [maps(2 * n) for _ in range(3)]
    masks = []
    for k in range(2 * n):
        y, x = 4 + (5 * k) % 20, 4 + (7 * k) % 36
        for s in range(3):
            bad[s][k, y : y + 6, x : x + 6] -= defect
        mask = np.zeros(size, bool)
        mask[y : y + 6, x : x + 6] = True
        masks.append(mask)
    return SyntheticCheck(good, bad, masks, per_image=2), _Model(size)


def test_a_clear_gain_switches_to_the_right_blur_and_no_gain_keeps_the_papers_maps() -> None:
    check, model = _check(40, defect=0.3)
    chosen, evidence = choose_maps(model, check)
    # sigma 2 matches a 6-pixel defect; 8 blurs it into its surroundings and does worse than no blur
    assert chosen == ("per_image", 2.0)
    auroc, lower = evidence["pixel_auroc"], evidence["difference_lower_bound"]
    assert (
        auroc["per_image, smoothing 2"]
        > auroc["per_image, smoothing 0"] + 10
        > auroc["per_image, smoothing 8"] + 10
    )
    assert lower["per_image, smoothing 2"] > 0 > lower["per_image, smoothing 8"]
    # the same data with no defect signal: nothing beats the incumbent beyond the noise
    check, model = _check(40, defect=0.0)
    chosen, evidence = choose_maps(model, check)
    assert chosen == INCUMBENT
    assert all(v <= 0 for v in evidence["difference_lower_bound"].values())


def test_fixed_settings_are_kept_and_measured() -> None:
    check, model = _check(6, defect=0.6)
    chosen, evidence = choose_maps(model, check, normalization="global", smoothing=0)
    assert chosen == ("global", 0.0) and list(evidence["pixel_auroc"]) == ["global, smoothing 0"]
    assert (model.anomaly.normalization, model.anomaly.smoothing) == ("per_image", 0.0)  # left as it was


def test_a_large_check_is_judged_on_a_seeded_subset_and_still_finds_the_blur(monkeypatch) -> None:
    import msflow.train.synthetic_check as synthetic_check  # the bound both choices share

    monkeypatch.setattr(synthetic_check, "BOOTSTRAP_MAX_IMAGES", 25)
    check, model = _check(40, defect=0.3)
    chosen, evidence = choose_maps(model, check, seed=3)
    assert evidence["good_images"] == 25 and evidence["synthetic_images"] == 50  # what was judged
    assert chosen == ("per_image", 2.0)
