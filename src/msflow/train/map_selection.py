"""Choosing the maps' normalisation and smoothing without test labels: synthetic defects' exact masks.

Every (normalisation, smoothing) setting is judged by the pixel AUROC it reaches on the synthetic check's
defects (exact masks, no test image), under the rule every label-free choice uses
(``msflow.train.synthetic_check.keep_unless_beaten``) with the paper's maps (:data:`INCUMBENT`) as the
incumbent; why the maps are chosen per dataset: docs/choices.md, "Maps". Pixel AUROC under a bootstrap
draw is a weighted sum of per-image histograms over the maps' fixed range [0, number of scales]
(``msflow.evaluate.streaming``), so thousands of draws cost a matrix product.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from msflow.data.images import resize_mask
from msflow.evaluate.metrics import bootstrap_counts
from msflow.evaluate.streaming import Binning, auroc_from_histograms
from msflow.model.anomaly_map import AnomalyMapper
from msflow.scoring import MAPS_INCUMBENT, MapSettings, map_candidates, map_setting_name
from msflow.train.synthetic_check import (
    BOOTSTRAP_ROUNDS,
    Maps,
    SyntheticCheck,
    judge,
    lower_bounds,
    map_batches,
)

INCUMBENT = MAPS_INCUMBENT  # the paper's maps
BINS = 4096  # of the pixel histograms; ties within a bin count 1/2 (the AUROC's error is recorded)


@torch.no_grad()
def pixel_histograms(
    mapper: AnomalyMapper, check: SyntheticCheck, setting: tuple[str, float], binning: Binning
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defect-pixel counts of each copy, other-pixel counts of each copy, counts of each good image),
    each (images, bins), of the "add" (pixel) map under ``setting``, at the maps' own size."""
    mapper = mapper.with_settings(
        mapper.settings.with_changes(normalization=setting[0], smoothing=setting[1])
    )

    def pixel_maps(maps: Maps) -> Iterator[np.ndarray]:
        for batch, size in map_batches(maps, mapper.image_size):
            out = mapper.from_log_likelihoods([m.to(mapper.ref_mul.device) for m in batch], size)
            yield from out.pixel_map.cpu().numpy()

    good = [binning.counts(m) for m in pixel_maps(check.good)]
    defective = zip(pixel_maps(check.defective), check.masks, strict=True)
    joint = [binning.joint_counts(m, resize_mask(mask, m.shape)) for m, mask in defective]
    return np.stack([p for p, _ in joint]), np.stack([n for _, n in joint]), np.stack(good)


def bootstrap_pixel_aurocs(
    histograms: tuple[np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray, per_image: int
) -> np.ndarray:
    """Pixel AUROC under each row of ``weights`` (rounds, source images): how often each good image was
    drawn; its synthetic copies weigh as much (a cluster bootstrap). Rows of ones give the AUROC."""
    pos, neg, good = (h.astype(np.float64) for h in histograms)
    copies = np.repeat(weights, per_image, axis=1)
    return auroc_from_histograms(copies @ pos, copies @ neg + weights @ good)[0]


def choose_maps(
    model: object,
    check: SyntheticCheck,
    normalization: str = "auto",
    smoothing: float | str = "auto",
    seed: int = 0,
) -> tuple[tuple[str, float], dict]:
    """The (normalization, smoothing) the run uses and the evidence (see the module doc); ``model``
    is anything with an ``anomaly`` mapper, which is left as it is."""
    mapper: AnomalyMapper = model.anomaly  # type: ignore[attr-defined]
    settings = map_candidates(normalization, smoothing)
    incumbent = MapSettings(normalization, smoothing).resolved().maps  # "auto": the paper's
    binning = Binning(0.0, float(len(mapper.ref_add)), BINS)  # the "add" map's range
    rng = np.random.default_rng(seed)
    check = check.subset(rng)
    n = check.sources
    weights = bootstrap_counts(n, BOOTSTRAP_ROUNDS, rng)
    aurocs, draws = {}, {}
    for setting in settings:
        histograms = pixel_histograms(mapper, check, setting, binning)
        aurocs[setting] = float(bootstrap_pixel_aurocs(histograms, np.ones((1, n)), check.per_image)[0])
        draws[setting] = bootstrap_pixel_aurocs(histograms, weights, check.per_image)
    lower = lower_bounds(draws, incumbent)
    chosen, judged = judge(aurocs, lower, incumbent, "pixel AUROC (exact masks)", check, map_setting_name)
    evidence = {
        "chosen": {"normalization": chosen[0], "smoothing": chosen[1]},
        "pixel_auroc": {map_setting_name(s): round(aurocs[s], 3) for s in settings},
        **judged,
        "histogram_bins": BINS,
    }
    return chosen, evidence
