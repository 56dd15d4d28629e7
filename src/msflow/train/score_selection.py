"""Choosing the image score without test labels: held-out good images against synthetic defects.

Every candidate score (``msflow.model.anomaly_map.image_score``) reads the same latents, so one forward
pass per image gives them all. ``choose_score`` runs the trained model over the good images held out
from training and over defective copies of them (``msflow.data.synthetic``) and computes the image AUROC
of every candidate on that labelled-by-construction set. It is what ``msflow train --score auto`` runs
(and every run records, as evidence); benchmarks/scoring_study.py uses the same functions across
datasets to choose the default.

The best AUROC alone is a poor rule: with a few dozen held-out images, the best of 21 candidates is
often a noisy "max" score that wins by a pair or two and loses on the test set (measured: -9 points on
a hard texture). So ``auto`` keeps :data:`INCUMBENT`, the score that won across the shared sets, and
switches only to a candidate whose AUROC beats it beyond the check's sampling error: the lower bound of
a paired bootstrap of the difference (resampling the held-out images together with their synthetic
copies) must be above zero at 95 %, Bonferroni-corrected for the number of challengers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from msflow.config import AUTO_INCUMBENT, SCORE_KINDS
from msflow.data.images import ImageLike, decode, to_tensor
from msflow.data.synthetic import AREA_RANGE, synthetic_set
from msflow.evaluate.metrics import image_auroc
from msflow.model.anomaly_map import image_score, log_likelihood_maps
from msflow.model.msflow import MSFlow

FRACTIONS = ("0.1", "0.03", "0.01", "0.001", "max")
CANDIDATES = ("official", *(f"{kind}:{f}" for kind in SCORE_KINDS for f in FRACTIONS))
SYNTHETIC_PER_IMAGE = 2  # defective copies of each held-out good image
# The score that won on most shared sets: "auto" keeps it unless a candidate beats it beyond the noise
# (and uses it when fewer than two good images are left to judge on).
INCUMBENT = AUTO_INCUMBENT
CONFIDENCE = 0.95  # of the bootstrap's lower bound, for all challengers together (Bonferroni)
BOOTSTRAP_ROUNDS = 4000
# The bootstrap's cost grows with (images)^2: beyond this many held-out images it resamples a seeded
# subset of them (the bound is already tight there), so the check stays seconds on any dataset.
BOOTSTRAP_MAX_IMAGES = 500


@torch.no_grad()
def logp_maps(
    model: MSFlow, images: Sequence[ImageLike], device: torch.device, batch_size: int = 8
) -> list[Tensor]:
    """Per-scale (N, h_s, w_s) log-likelihood maps of ``images`` (CPU float32), in input order.

    ``images`` may be files: they are decoded a batch at a time, so a whole test set fits in memory.
    """
    model.eval()
    out: list[list[Tensor]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [to_tensor(im, model.config.image_size) for im in images[start : start + batch_size]]
        )
        out.append([m.float().cpu() for m in log_likelihood_maps(model(batch.to(device)).zs)])
    return [torch.cat([b[s] for b in out]) for s in range(len(out[0]))]


def official_name(model: MSFlow) -> str:
    """The ``KIND:FRACTION`` name of what "official" computes under the model's normalisation."""
    kind = "gmul" if model.anomaly.normalization == "global" else "mul"
    return f"{kind}:{model.anomaly.top_k:g}"


# Per-scale log-likelihood maps of a set of images: batched (N, h_s, w_s) tensors when every image has the
# model's input size, or one list of (1, h_s, w_s) maps per image (stitched from tiles: each its own size).
Maps = list[Tensor] | list[list[Tensor]]


def map_batches(
    maps: Maps, size: tuple[int, int], chunk: int = 32
) -> Iterator[tuple[list[Tensor], tuple[int, int]]]:
    """(per-scale maps of a few images, the size their anomaly maps have), in image order."""
    if maps and isinstance(maps[0], list):  # one image at a time, at its own (stitched) size
        for per_scale in maps:
            yield per_scale, (int(per_scale[0].shape[-2]), int(per_scale[0].shape[-1]))
        return
    for start in range(0, int(maps[0].shape[0]), chunk):
        yield [m[start : start + chunk] for m in maps], size


@dataclass
class SyntheticCheck:
    """The labelled-by-construction set every label-free choice is judged on: the model's maps of good
    images (held out from training) and of ``SYNTHETIC_PER_IMAGE`` defective copies of each, with the
    copies' exact masks (original image size). Copy ``k`` is drawn into good image ``k // per_image``."""

    good: Maps
    defective: Maps
    masks: list[np.ndarray]
    per_image: int = SYNTHETIC_PER_IMAGE
    seed: int = 0

    @property
    def sources(self) -> int:
        """Number of good (source) images, each with ``per_image`` copies."""
        return len(self.masks) // self.per_image


def synthetic_check(
    model: MSFlow,
    good_images: Sequence[ImageLike],
    device: torch.device,
    batch_size: int = 8,
    seed: int = 0,
    log_likelihoods: Callable[[list[np.ndarray]], list[list[Tensor]]] | None = None,
) -> SyntheticCheck:
    """Draw the synthetic defects (seeded) and run the model once over both sets.

    ``log_likelihoods`` (``Predictor.log_likelihoods``) gives each decoded image's per-scale maps when
    they are not the model's own, i.e. stitched from tiles.
    """
    if len(good_images) < 2:
        raise ValueError("a synthetic check needs at least two held-out good images")
    synthetic = synthetic_set(good_images, SYNTHETIC_PER_IMAGE, seed)
    defective = [im for im, _ in synthetic]

    def maps(images: Sequence[ImageLike]) -> Maps:
        if log_likelihoods is not None:  # a tiled model: stitched maps, one size per image
            return log_likelihoods([decode(im) for im in images])
        return logp_maps(model, images, device, batch_size)

    return SyntheticCheck(maps(good_images), maps(defective), [m for _, m in synthetic], seed=seed)


def candidate_scores(
    logps: Maps, model: MSFlow, candidates: Sequence[str] = CANDIDATES, chunk: int = 32
) -> dict[str, np.ndarray]:
    """Every candidate's (N,) image scores from per-scale maps (chunked: the maps are full size), under
    the model's smoothing."""
    area = model.anomaly.image_size[0] * model.anomaly.image_size[1]  # as AnomalyMapper reduces
    sigma = model.anomaly.smoothing
    names = {c: official_name(model) if c == "official" else c for c in candidates}
    scores: dict[str, list[Tensor]] = {c: [] for c in candidates}
    for batch, size in map_batches(logps, model.anomaly.image_size, chunk):
        part = [m.to(model.anomaly.ref_mul.device) for m in batch]
        for c, name in names.items():
            scores[c].append(image_score(name, part, size, model.anomaly.ref_mul, area, sigma).cpu())
    return {c: torch.cat(v).double().numpy() for c, v in scores.items()}


def rank_candidates(good: dict[str, np.ndarray], bad: dict[str, np.ndarray]) -> dict[str, float]:
    """Image AUROC (%) of each candidate, good images as negatives, defective ones as positives."""
    out = {}
    for c in good:
        labels = np.r_[np.zeros(len(good[c])), np.ones(len(bad[c]))]
        out[c] = round(image_auroc(labels, np.r_[good[c], bad[c]]), 3)  # already in %
    return out


def _pair_wins(good: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(n_bad, n_good) matrix: 1 where a defective image scores above a good one, 0.5 for a tie."""
    return (bad[:, None] > good[None, :]) + 0.5 * (bad[:, None] == good[None, :])


def weighted_auroc(
    good: np.ndarray, bad: np.ndarray, good_weights: np.ndarray, bad_weights: np.ndarray
) -> np.ndarray:
    """Image AUROC (%) under each row of weights (how often each image was drawn): a bootstrap's AUROCs.

    ``good_weights`` is (rounds, n_good), ``bad_weights`` (rounds, n_bad); rows of ones give the AUROC.
    """
    wins = bad_weights @ _pair_wins(good, bad)  # (rounds, n_good)
    return 100 * (wins * good_weights).sum(-1) / (bad_weights.sum(-1) * good_weights.sum(-1))


def bounded_sources(n: int, per_image: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Beyond :data:`BOOTSTRAP_MAX_IMAGES` source images, a seeded subset of them and their copies'
    indices (copy ``k`` belongs to source ``k // per_image``); ``None`` when all of them are kept."""
    if n <= BOOTSTRAP_MAX_IMAGES:
        return None
    keep = np.sort(rng.choice(n, BOOTSTRAP_MAX_IMAGES, replace=False))
    return keep, (keep[:, None] * per_image + np.arange(per_image)).ravel()


def bootstrap_counts(n: int, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, n) float counts: how often each of ``n`` source images is drawn in each bootstrap round."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(float)


def difference_lower_bounds(
    good: dict[str, np.ndarray],
    bad: dict[str, np.ndarray],
    incumbent: str,
    per_image: int = SYNTHETIC_PER_IMAGE,
    confidence: float = CONFIDENCE,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict[str, float]:
    """Lower bound (AUROC points) of each candidate's AUROC minus the incumbent's, by paired bootstrap.

    ``bad[c][k]`` is a defective copy of good image ``k // per_image``, so the bootstrap draws source
    images: a draw weights a good image and its copies by how often it was drawn (a cluster bootstrap;
    resampling copies apart from their source would understate the noise). Every candidate is judged on
    the same draws (paired). The bound is the ``(1 - confidence) / challengers`` quantile of the
    difference over ``rounds`` draws.
    """
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

    def bootstrap_auroc(c: str) -> np.ndarray:
        return weighted_auroc(good[c], bad[c], counts, bad_counts)

    base = bootstrap_auroc(incumbent)
    q = (1 - confidence) / max(len(good) - 1, 1)
    return {
        c: 0.0 if c == incumbent else round(float(np.quantile(bootstrap_auroc(c) - base, q)), 3) for c in good
    }


def choose_score(
    model: MSFlow, check: SyntheticCheck, source: str = "holdout", also: str | None = None
) -> tuple[str, dict]:
    """The score ``auto`` uses, judged on the run's :func:`synthetic_check`, and the evidence.

    :data:`INCUMBENT`, unless candidates beat it beyond the sampling error (their bootstrap lower bound
    is above zero): then the best of those (ties go to the earlier in :data:`CANDIDATES`, "official"
    first). Scores are computed under the model's maps (normalisation, smoothing), so training
    chooses the maps first. ``also`` is a score that is measured too (the one a run uses, when it is
    not a candidate) but never chosen; ``source`` says where the good images came from.
    """
    candidates = CANDIDATES if also in (None, *CANDIDATES) else (*CANDIDATES, also)
    good, bad = (
        candidate_scores(check.good, model, candidates),
        candidate_scores(check.defective, model, candidates),
    )
    aurocs = rank_candidates(good, bad)
    lower = difference_lower_bounds(
        {c: good[c] for c in CANDIDATES},
        {c: bad[c] for c in CANDIDATES},
        INCUMBENT,
        check.per_image,
        seed=check.seed,
    )

    def rank(c: str) -> tuple[float, int]:  # higher AUROC first; ties to the earlier candidate
        return aurocs[c], -CANDIDATES.index(c)

    best = max([c for c in CANDIDATES if lower[c] > 0] or [INCUMBENT], key=rank)
    top = max(CANDIDATES, key=rank)
    chosen = official_name(model) if best == "official" else best
    evidence = {
        "chosen": chosen,
        "rule": (
            f"{INCUMBENT} unless candidates have a higher image AUROC on held-out good images vs synthetic "
            f"defects drawn into them beyond the sampling error (lower bound of a paired cluster bootstrap "
            f"of the difference > 0 at {CONFIDENCE:.0%}, Bonferroni over {len(CANDIDATES) - 1} challengers); "
            "then the best of those"
        ),
        "highest_auroc": top,
        "incumbent": INCUMBENT,
        "difference_lower_bound": lower,
        "bootstrap_rounds": BOOTSTRAP_ROUNDS,
        "smoothing": model.anomaly.smoothing,
        "good_images": check.sources,
        "good_source": source,
        "synthetic_images": len(check.masks),
        "synthetic_seed": check.seed,
        "synthetic_area_range": list(AREA_RANGE),
        "auroc": aurocs,
    }
    return chosen, evidence


__all__ = [
    "CANDIDATES",
    "INCUMBENT",
    "Maps",
    "SyntheticCheck",
    "bootstrap_counts",
    "bounded_sources",
    "candidate_scores",
    "choose_score",
    "difference_lower_bounds",
    "logp_maps",
    "map_batches",
    "rank_candidates",
    "synthetic_check",
    "weighted_auroc",
]
