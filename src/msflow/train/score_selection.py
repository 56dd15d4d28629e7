"""Choosing the image score without test labels: held-out good images against synthetic defects.

Every candidate score (``msflow.scoring.SCORE_CANDIDATES``, computed by
``msflow.model.anomaly_map.image_score``) reads the same latents, so one forward pass per image gives
them all. :func:`choose_score` computes the image AUROC of every candidate on the run's synthetic check
(``msflow.train.synthetic_check``) and applies the one rule there: keep :data:`INCUMBENT` unless a
candidate beats it by at least ``MIN_EFFECT`` points and beyond the sampling error.

The best AUROC alone is a poor rule: with a few dozen held-out images, the best of many candidates is
often a noisy "max" score that wins by a pair or two and loses on the test set (measured: -9 points on
a hard texture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from msflow.data.datasets import Sample
from msflow.data.synthetic import AREA_RANGE
from msflow.errors import MSFlowError
from msflow.evaluate.metrics import auroc_difference_interval, bootstrap_counts, image_auroc, weighted_auroc
from msflow.infer.predictor import Predictor
from msflow.model.anomaly_map import AnomalyMapper, image_score
from msflow.scoring import SCORE_CANDIDATES, SCORE_INCUMBENT
from msflow.train.synthetic_check import (
    BOOTSTRAP_ROUNDS,
    SYNTHETIC_PER_IMAGE,
    Maps,
    SyntheticCheck,
    bounded_sources,
    judge,
    lower_bounds,
    map_batches,
    predictor_maps,
)

CANDIDATES = SCORE_CANDIDATES
INCUMBENT = SCORE_INCUMBENT


@torch.no_grad()
def candidate_scores(
    logps: Maps, mapper: AnomalyMapper, candidates: Sequence[str] = CANDIDATES
) -> dict[str, np.ndarray]:
    """Every candidate's (N,) image scores from per-scale maps (chunked: the maps are full size), under
    the mapper's settings (normalisation for "official", smoothing for names without their own blur)."""
    area = mapper.image_size[0] * mapper.image_size[1]  # as AnomalyMapper reduces
    names = {c: mapper.settings.score_name(c) for c in candidates}
    scores: dict[str, list[Tensor]] = {c: [] for c in candidates}
    for batch, size in map_batches(logps, mapper.image_size):
        part = [m.to(mapper.ref_mul.device) for m in batch]
        for c, name in names.items():
            scores[c].append(image_score(name, part, size, mapper.ref_mul, area, mapper.smoothing).cpu())
    return {c: torch.cat(v).double().numpy() for c, v in scores.items()}


def candidate_report(predictor: Predictor, samples: list[Sample], batch_size: int = 8) -> dict:
    """REPORT ONLY (``msflow test --all-scores``): every candidate score's image AUROC on a labelled
    test set under the predictor's maps, from one pass over it, and the 95 % interval of each one's
    difference to the score the predictor uses. No choice ever reads it."""
    labels = np.array([s.label for s in samples])
    if len(set(labels.tolist())) < 2:
        raise MSFlowError("--all-scores needs good and defective test images")
    mapper: AnomalyMapper = predictor.model.anomaly
    used = mapper.score
    candidates = CANDIDATES if used in CANDIDATES else (*CANDIDATES, used)
    maps = predictor_maps(predictor, [s.image for s in samples], batch_size)
    scores = candidate_scores(maps, mapper, candidates)
    good, bad = ({c: v[labels == label] for c, v in scores.items()} for label in (0, 1))
    return {
        "report_only": "test labels: never used by any choice",
        "maps": {"normalization": mapper.normalization, "smoothing": mapper.smoothing},
        "used": used,
        "image_auroc": rank_candidates(good, bad),
        "difference_to_used_95": {
            c: auroc_difference_interval(scores[c], scores[used], labels) for c in candidates
        },
    }


def rank_candidates(good: dict[str, np.ndarray], bad: dict[str, np.ndarray]) -> dict[str, float]:
    """Image AUROC (%) of each candidate, good images as negatives, defective ones as positives."""
    out = {}
    for c in good:
        labels = np.r_[np.zeros(len(good[c])), np.ones(len(bad[c]))]
        out[c] = round(image_auroc(labels, np.r_[good[c], bad[c]]), 3)  # already in %
    return out


def difference_lower_bounds(
    good: dict[str, np.ndarray],
    bad: dict[str, np.ndarray],
    incumbent: str,
    per_image: int = SYNTHETIC_PER_IMAGE,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict[str, float]:
    """Lower bound (AUROC points) of each candidate's AUROC minus the incumbent's, by a paired bootstrap
    of source images: ``bad[c][k]`` is a copy of good image ``k // per_image`` and weighs as its source
    (resampling copies apart from their source would understate the noise)."""
    n = len(good[incumbent])
    if any(len(b) != per_image * n for b in bad.values()):
        raise ValueError(f"expected {per_image} defective copies of each of the {n} good images")
    rng = np.random.default_rng(seed)
    subset = bounded_sources(n, per_image, rng)
    if subset is not None:
        keep, copies = subset
        good = {c: v[keep] for c, v in good.items()}
        bad = {c: v[copies] for c, v in bad.items()}
        n = len(keep)
    counts = bootstrap_counts(n, rounds, rng)
    bad_counts = np.repeat(counts, per_image, axis=1)  # each copy weighs as its source image

    draws = {c: weighted_auroc(good[c], bad[c], counts, bad_counts) for c in good}
    return {c: round(v, 3) for c, v in lower_bounds(draws, incumbent).items()}


def choose_score(
    model: object, check: SyntheticCheck, source: str = "holdout", also: str | None = None
) -> tuple[str, dict]:
    """The score ``auto`` uses on the run's synthetic check (:data:`INCUMBENT` unless beaten; ties to the
    earlier in :data:`CANDIDATES`), and the evidence. Scores are computed under ``model.anomaly``'s maps,
    so training chooses the maps first. ``also``: a score measured too (the one a run uses, when it is
    not a candidate) but never chosen; ``source``: where the good images came from."""
    mapper: AnomalyMapper = model.anomaly  # type: ignore[attr-defined]
    candidates = CANDIDATES if also in (None, *CANDIDATES) else (*CANDIDATES, also)
    good, bad = (candidate_scores(maps, mapper, candidates) for maps in (check.good, check.defective))
    aurocs = rank_candidates(good, bad)
    choosable = ({c: scores[c] for c in CANDIDATES} for scores in (good, bad))  # not ``also``
    lower = difference_lower_bounds(*choosable, INCUMBENT, check.per_image, seed=check.seed)
    best, judged = judge({c: aurocs[c] for c in CANDIDATES}, lower, INCUMBENT, "image AUROC", check)
    top = max(CANDIDATES, key=aurocs.__getitem__)  # the first of equal AUROCs
    evidence = {
        "chosen": mapper.settings.score_name(best),
        "highest_auroc": top,
        **judged,
        "smoothing": mapper.smoothing,
        "good_source": source,
        "synthetic_area_range": list(AREA_RANGE),
        "auroc": aurocs,
    }
    return evidence["chosen"], evidence
