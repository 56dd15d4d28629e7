"""Choosing the maps' normalisation and smoothing without test labels: synthetic defects' exact masks.

The anomaly maps (``msflow.model.anomaly_map``) have two settings that the paper fixes and that matter
on real data: ``normalization`` (each image against its own most likely point, or against the training
images) and ``smoothing`` (a Gaussian blur of sigma pixels). Which is better depends on the data: global
normalisation gained 1.5 pixel-AUROC points on Magnetic Tile and nothing on the hard textures. The
synthetic defects that ``msflow train`` draws into held-out good images (``msflow.data.synthetic``) come
with exact masks, so every setting can be judged by the pixel AUROC it reaches on them, with no test
image and no label.

The rule is the one the image score uses (``msflow.train.score_selection``): keep the paper's maps
(:data:`INCUMBENT`) unless another setting beats them beyond the check's sampling error, i.e. the lower
bound of a paired cluster bootstrap of the pixel-AUROC difference (resampling source images together
with their synthetic copies, Bonferroni over the challengers) is above zero; then the best of those.
Pixel AUROC under a bootstrap draw is a weighted sum of per-image histograms over the maps' fixed range
[0, number of scales] (``msflow.evaluate.streaming``), so thousands of draws cost a matrix product.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from msflow.config import SMOOTHING_CANDIDATES
from msflow.evaluate.streaming import Binning, auroc_from_histograms
from msflow.model.msflow import MSFlow
from msflow.train.score_selection import (
    BOOTSTRAP_ROUNDS,
    CONFIDENCE,
    Maps,
    SyntheticCheck,
    bootstrap_counts,
    bounded_sources,
    map_batches,
)

NORMALIZATIONS = ("per_image", "global")
INCUMBENT = ("per_image", 0.0)  # the paper's maps
BINS = 4096  # of the pixel histograms; ties within a bin count 1/2 (the AUROC's error is recorded)


def candidates(normalization: str, smoothing: float | str) -> list[tuple[str, float]]:
    """The settings to judge: every combination the run leaves to ``auto``, the fixed ones as given."""
    norms = NORMALIZATIONS if normalization == "auto" else (normalization,)
    sigmas = SMOOTHING_CANDIDATES if smoothing == "auto" else (float(smoothing),)
    return [(n, float(s)) for n in norms for s in sigmas]


def setting_name(setting: tuple[str, float]) -> str:
    return f"{setting[0]}, smoothing {setting[1]:g}"


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(image) > 127


@torch.no_grad()
def pixel_histograms(
    model: MSFlow, check: SyntheticCheck, setting: tuple[str, float], binning: Binning
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defect-pixel counts of each copy, other-pixel counts of each copy, counts of each good image),
    each (images, bins), of the "add" (pixel) map under ``setting``, at the maps' own size."""
    mapper = model.anomaly
    saved = mapper.normalization, mapper.smoothing
    mapper.normalization, mapper.smoothing = setting
    try:
        good, pos, neg = [], [], []
        for batch, size in map_batches(check.good, mapper.image_size):
            out = mapper.from_log_likelihoods([m.to(mapper.ref_mul.device) for m in batch], size)
            good.extend(binning.counts(m) for m in out.pixel_map.cpu().numpy())
        masks = iter(check.masks)
        for batch, size in map_batches(check.defective, mapper.image_size):
            out = mapper.from_log_likelihoods([m.to(mapper.ref_mul.device) for m in batch], size)
            for m in out.pixel_map.cpu().numpy():
                p, n = binning.joint_counts(m, _resized_mask(next(masks), m.shape))
                pos.append(p)
                neg.append(n)
    finally:
        mapper.normalization, mapper.smoothing = saved
    return np.stack(pos), np.stack(neg), np.stack(good)


def bootstrap_pixel_aurocs(
    histograms: tuple[np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray, per_image: int
) -> np.ndarray:
    """Pixel AUROC under each row of ``weights`` (rounds, source images): how often each good image was
    drawn; its synthetic copies weigh as much (a cluster bootstrap). Rows of ones give the AUROC."""
    pos, neg, good = (h.astype(np.float64) for h in histograms)
    copies = np.repeat(weights, per_image, axis=1)
    return auroc_from_histograms(copies @ pos, copies @ neg + weights @ good)[0]


def _subset(check: SyntheticCheck, rng: np.random.Generator) -> SyntheticCheck:
    """At most ``BOOTSTRAP_MAX_IMAGES`` seeded source images with their copies: the cost stays bounded."""
    subset = bounded_sources(check.sources, check.per_image, rng)
    if subset is None:
        return check
    keep, copies = subset

    def pick(maps: Maps, rows: np.ndarray) -> Maps:
        if isinstance(maps[0], list):  # one entry per image
            return [maps[i] for i in rows]
        index = torch.from_numpy(rows)
        return [m[index] for m in maps]

    return replace(
        check,
        good=pick(check.good, keep),
        defective=pick(check.defective, copies),
        masks=[check.masks[i] for i in copies],
    )


def choose_maps(
    model: MSFlow,
    check: SyntheticCheck,
    normalization: str = "auto",
    smoothing: float | str = "auto",
    seed: int = 0,
) -> tuple[tuple[str, float], dict]:
    """The (normalization, smoothing) the run uses and the evidence (see the module doc)."""
    settings = candidates(normalization, smoothing)
    incumbent = (
        INCUMBENT[0] if normalization == "auto" else normalization,
        INCUMBENT[1] if smoothing == "auto" else float(smoothing),
    )
    binning = Binning(0.0, float(len(model.anomaly.ref_add)), BINS)  # the "add" map's range
    rng = np.random.default_rng(seed)
    check = _subset(check, rng)
    n = check.sources
    weights = bootstrap_counts(n, BOOTSTRAP_ROUNDS, rng)
    aurocs, draws = {}, {}
    for setting in settings:
        histograms = pixel_histograms(model, check, setting, binning)
        aurocs[setting] = float(bootstrap_pixel_aurocs(histograms, np.ones((1, n)), check.per_image)[0])
        draws[setting] = bootstrap_pixel_aurocs(histograms, weights, check.per_image)
    q = (1 - CONFIDENCE) / max(len(settings) - 1, 1)
    lower = {
        s: 0.0 if s == incumbent else float(np.quantile(draws[s] - draws[incumbent], q)) for s in settings
    }

    def rank(s: tuple[str, float]) -> tuple[float, int]:  # higher AUROC first; ties to the earlier
        return aurocs[s], -settings.index(s)

    chosen = max([s for s in settings if lower[s] > 0] or [incumbent], key=rank)
    evidence = {
        "chosen": {"normalization": chosen[0], "smoothing": chosen[1]},
        "rule": (
            f"{setting_name(incumbent)} unless settings have a higher pixel AUROC on held-out good images "
            "and synthetic defects drawn into them (exact masks) beyond the sampling error (lower bound of a "
            f"paired cluster bootstrap of the difference > 0 at {CONFIDENCE:.0%}, Bonferroni over "
            f"{len(settings) - 1} challengers); then the best of those"
        ),
        "incumbent": setting_name(incumbent),
        "pixel_auroc": {setting_name(s): round(aurocs[s], 3) for s in settings},
        "difference_lower_bound": {setting_name(s): round(lower[s], 3) for s in settings},
        "bootstrap_rounds": BOOTSTRAP_ROUNDS,
        "histogram_bins": BINS,
        "good_images": n,
        "synthetic_images": len(check.masks),
        "synthetic_seed": check.seed,
    }
    return chosen, evidence


__all__ = ["INCUMBENT", "NORMALIZATIONS", "candidates", "choose_maps", "setting_name"]
