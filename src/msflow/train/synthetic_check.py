"""The label-free evidence every automatic choice is judged on, and the one rule that judges it.

The synthetic check: the good images held out from training, and defective copies of them
(``msflow.data.synthetic``) with exact masks, run once through the trained model (through the
:class:`~msflow.infer.predictor.Predictor`, so a tiled model judges stitched whole images, as it does at
test time). Both choices (``msflow.train.score_selection`` for the image score,
``msflow.train.map_selection`` for the maps), ``msflow test --choose`` and the study scripts read it;
both choices apply the rule and record its evidence through :func:`judge`.

The rule, "keep the incumbent unless beaten" (:func:`keep_unless_beaten`): a challenger replaces the
incumbent only if (1) the lower bound of a paired cluster bootstrap of its AUROC minus the incumbent's
is above zero (95 %, Bonferroni over the challengers): the gain is not noise, and (2) the gain itself
is at least :data:`MIN_EFFECT` AUROC points: it matters. Condition (1) alone switched a real set's maps
for +0.31 points on the proxy (bound +0.025) and lost 21 pixel-AUROC points on its real defects; the
proxy's synthetic defects are not real ones, so a gain smaller than the proxy's own disagreement with
real masks is not evidence (docs/results.md "Label-free choices").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor

from msflow.data.images import ImageLike, decode, to_tensor
from msflow.data.synthetic import synthetic_set

if TYPE_CHECKING:
    from msflow.infer.predictor import Predictor

SYNTHETIC_PER_IMAGE = 2  # defective copies of each held-out good image
CONFIDENCE = 0.95  # of the bootstrap's lower bound, for all challengers together (Bonferroni)
BOOTSTRAP_ROUNDS = 4000
# The bootstrap's cost grows with (images)^2: beyond this many held-out images it resamples a seeded
# subset of them (the bound is already tight there), so the check stays seconds on any dataset.
BOOTSTRAP_MAX_IMAGES = 500
# The smallest gain (AUROC points on the synthetic check) for which a label-free choice leaves its
# incumbent (the paper's maps, the default score). See the module doc and docs/results.md.
MIN_EFFECT = 1.0

Key = TypeVar("Key", bound=Hashable)
# Per-scale log-likelihood maps of a set of images: batched (N, h_s, w_s) tensors when every image has the
# model's input size, or one list of (1, h_s, w_s) maps per image (stitched from tiles: each its own size).
Maps = list[Tensor] | list[list[Tensor]]


@torch.no_grad()
def predictor_maps(predictor: Predictor, images: Sequence[ImageLike], batch_size: int = 8) -> Maps:
    """Per-scale maps of ``images`` as the predictor judges them: stitched whole images for a tiled
    model (one list per image), else the model's own (N, h_s, w_s) maps (CPU float32), decoded and run
    a batch at a time (a whole test set fits in memory)."""
    if predictor.tiled:
        return predictor.log_likelihoods([decode(im) for im in images])
    predictor.model.eval()
    out: list[list[Tensor]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [to_tensor(im, predictor.image_size) for im in images[start : start + batch_size]]
        )
        out.append([m.cpu() for m in predictor.batch_log_likelihoods(batch)])
    return [torch.cat(per_scale) for per_scale in zip(*out, strict=True)]


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

    def subset(self, rng: np.random.Generator) -> SyntheticCheck:
        """At most :data:`BOOTSTRAP_MAX_IMAGES` seeded source images with their copies (bounded cost)."""
        chosen = bounded_sources(self.sources, self.per_image, rng)
        if chosen is None:
            return self
        keep, copies = chosen

        def pick(maps: Maps, rows: np.ndarray) -> Maps:
            if isinstance(maps[0], list):  # one entry per image
                return [maps[i] for i in rows]
            return [m[torch.from_numpy(rows)] for m in maps]

        masks = [self.masks[i] for i in copies]
        return replace(self, good=pick(self.good, keep), defective=pick(self.defective, copies), masks=masks)


def synthetic_check(
    predictor: Predictor, good_images: Sequence[ImageLike], batch_size: int = 8, seed: int = 0
) -> SyntheticCheck:
    """Draw the synthetic defects (seeded) into ``good_images`` and run the predictor's model once over
    both sets (tiled models: stitched, as :func:`predictor_maps`)."""
    if len(good_images) < 2:
        raise ValueError("a synthetic check needs at least two held-out good images")
    synthetic = synthetic_set(good_images, SYNTHETIC_PER_IMAGE, seed)
    good = predictor_maps(predictor, good_images, batch_size)
    defective = predictor_maps(predictor, [im for im, _ in synthetic], batch_size)
    return SyntheticCheck(good, defective, [m for _, m in synthetic], seed=seed)


def bounded_sources(n: int, per_image: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Beyond :data:`BOOTSTRAP_MAX_IMAGES` source images, a seeded subset of them and their copies'
    indices (copy ``k`` belongs to source ``k // per_image``); ``None`` when all of them are kept."""
    if n <= BOOTSTRAP_MAX_IMAGES:
        return None
    keep = np.sort(rng.choice(n, BOOTSTRAP_MAX_IMAGES, replace=False))
    return keep, (keep[:, None] * per_image + np.arange(per_image)).ravel()


def lower_bounds(draws: dict[Key, np.ndarray], incumbent: Key) -> dict[Key, float]:
    """Lower bound of each candidate's AUROC minus the incumbent's over paired bootstrap ``draws``
    (the same rounds for every candidate): the ``(1 - CONFIDENCE) / challengers`` quantile."""
    q = (1 - CONFIDENCE) / max(len(draws) - 1, 1)
    base = draws[incumbent]
    return {c: 0.0 if c == incumbent else float(np.quantile(d - base, q)) for c, d in draws.items()}


def keep_unless_beaten(aurocs: dict[Key, float], lower: dict[Key, float], incumbent: Key) -> Key:
    """The incumbent, unless challengers gain at least :data:`MIN_EFFECT` points with a lower bound
    above zero; then the best of those (ties to the earlier in ``aurocs``' order)."""
    winners = [c for c in aurocs if lower[c] > 0 and aurocs[c] - aurocs[incumbent] >= MIN_EFFECT]
    return max(winners or [incumbent], key=aurocs.__getitem__)  # max keeps the first of equal AUROCs


def judge(
    aurocs: dict[Key, float],
    lower: dict[Key, float],
    incumbent: Key,
    what: str,
    check: SyntheticCheck,
    name: Callable[[Key], str] = str,
) -> tuple[Key, dict]:
    """The rule's pick (:func:`keep_unless_beaten`) and the evidence both choices record with it: the
    rule in words, each candidate's gain over the incumbent and its bound, the check it was judged on."""
    rule = (
        f"{name(incumbent)} unless candidates have a {what} on held-out good images vs synthetic defects "
        f"drawn into them higher by at least {MIN_EFFECT:g} point(s) AND beyond the sampling error (lower "
        f"bound of a paired cluster bootstrap of the difference > 0 at {CONFIDENCE:.0%}, Bonferroni over "
        f"{len(aurocs) - 1} challengers); then the best of those"
    )
    evidence = {
        "rule": rule,
        "incumbent": name(incumbent),
        "gain_over_incumbent": {name(c): round(aurocs[c] - aurocs[incumbent], 3) for c in aurocs},
        "difference_lower_bound": {name(c): round(v, 3) for c, v in lower.items()},
        "bootstrap_rounds": BOOTSTRAP_ROUNDS,
        "good_images": check.sources,
        "synthetic_images": len(check.masks),
        "synthetic_seed": check.seed,
    }
    return keep_unless_beaten(aurocs, lower, incumbent), evidence
