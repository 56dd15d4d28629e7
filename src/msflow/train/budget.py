"""``--budget MINUTES``: how many epochs of the official schedule fit a time budget on this machine.

With the features extracted, a copy of the flows is timed over two epoch lengths (the cost per image
apart from the fixed cost per epoch) and the evaluation estimated from the extraction rate; the epochs
that fit the rest of the budget become ``epochs`` (the schedule compressed: ``warmup`` and ``decay_at``
are fractions). What fewer epochs cost in accuracy is read from :data:`ACCURACY_CURVE`, measured on real
sets: a guide, not a promise.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from msflow.config import TrainConfig

# Test metrics (image AUROC with the default score logp:0.03, pixel AUROC at the original resolution,
# AUPRO) of `msflow train --data SET --epochs N` with every other setting at its default,
# efficientnet_lite0, on three real sets with pixel masks (code b4342e3; Magnetic Tile's 10-epoch row:
# code 6499b74 re-scored with the paper's maps). docs/results.md, "Accuracy against epochs", has the
# commands. More epochs are not always better: CrackForest's pixel metrics fall after 10 epochs.
ACCURACY_CURVE: dict[str, dict[int, tuple[float, float | None, float | None]]] = {
    "magnetic_tile": {10: (87.73, 76.07, 69.31), 25: (91.77, 77.05, 68.86), 100: (98.41, 78.54, 67.24)},
    "bsdata": {10: (91.37, 99.17, 78.97), 25: (91.80, 99.21, 79.68), 100: (92.02, 99.06, 76.78)},
    "crackforest": {10: (89.33, 87.14, 58.09), 25: (89.37, 85.42, 54.40), 100: (88.80, 80.67, 47.05)},
}
METRICS = ("image AUROC", "pixel AUROC", "AUPRO")
EVAL_COST_FACTOR = 2.0  # a test image costs about this many extraction images (maps, metrics: rough)


@dataclass
class EpochCost:
    """What one epoch costs here, measured on a few steps: seconds per image and fixed per epoch."""

    per_image: float
    fixed: float


def measure_epoch_cost(model, cache, cfg: TrainConfig, device: torch.device, steps: int = 2) -> EpochCost:
    """Time ``train_flows`` over ``steps`` and ``2 * steps`` batches on a copy of the model (the model,
    its optimizer and the global random state are left as they were)."""
    from msflow.train.features import FeatureCache
    from msflow.train.loop import TrainState, make_optimizer, train_flows

    bs = cfg.batch_size
    m = max(1, min(steps * bs, len(cache) // 2))
    probe_cfg = replace(cfg, epochs=1, stop="schedule", eval_every=0)
    with torch.random.fork_rng(devices=[]):
        twin = copy.deepcopy(model).train()
        optimizer = make_optimizer(twin.trainable_parameters(), cfg.lr, device)

        def epoch_over(n: int) -> float:
            part = FeatureCache([a[:n] for a in cache.arrays])
            start = time.perf_counter()
            train_flows(twin, part, probe_cfg, device, TrainState(), optimizer, progress=False)
            return time.perf_counter() - start

        epoch_over(min(bs, m))  # warm-up: kernels, Adam state
        small, large = epoch_over(m), epoch_over(2 * m)
    per_image = (large - small) / m if large > small else large / (2 * m)
    return EpochCost(per_image, max(small - m * per_image, 0.0))


def epochs_for_budget(seconds_left: float, epoch_seconds: float, most: int) -> int:
    """The most whole epochs (at least 1, at most ``most``) that fit in ``seconds_left``."""
    if epoch_seconds <= 0:
        return most
    return max(1, min(most, math.floor(seconds_left / epoch_seconds)))


def _interpolate(curve: dict[int, tuple], epochs: int, metric: int) -> float | None:
    """Linear between measured points; outside them, the nearest measured figure."""
    points = sorted((e, v[metric]) for e, v in curve.items() if v[metric] is not None)
    return float(np.interp(epochs, *zip(*points, strict=True))) if points else None


def expected_cost(epochs: int, full: int = 100) -> list[str]:
    """One line per measured data set: its metrics at ``epochs`` against ``full`` epochs."""
    lines = []
    for name, curve in ACCURACY_CURVE.items():
        parts = []
        for i, label in enumerate(METRICS):
            at, ref = _interpolate(curve, epochs, i), _interpolate(curve, full, i)
            if at is not None and ref is not None:
                parts.append(f"{label} {at:.2f} vs {ref:.2f} ({at - ref:+.2f})")
        measured = "/".join(str(e) for e in sorted(curve))
        lines.append(f"{name} (measured at {measured} epochs): " + ", ".join(parts))
    return lines


def plan(
    budget_minutes: float,
    spent_seconds: float,
    cost: EpochCost,
    train_images: int,
    test_images: int,
    extract_per_image: float,
    most: int,
) -> dict:
    """The epochs that fit the budget, and the estimate they came from (recorded in ``budget.json``)."""
    epoch = cost.fixed + cost.per_image * train_images
    evaluation = EVAL_COST_FACTOR * extract_per_image * test_images
    left = budget_minutes * 60 - spent_seconds - evaluation
    epochs = epochs_for_budget(left, epoch, most)
    return {
        "budget_minutes": budget_minutes,
        "spent_seconds": round(spent_seconds, 2),
        "epoch_seconds": round(epoch, 3),
        "per_image_seconds": cost.per_image,
        "fixed_epoch_seconds": cost.fixed,
        "evaluation_seconds_estimate": round(evaluation, 2),
        "epochs": epochs,
        "expected_total_minutes": round((spent_seconds + evaluation + epochs * epoch) / 60, 2),
        "fits": left >= epoch,
        "expected_cost": expected_cost(epochs),
    }
