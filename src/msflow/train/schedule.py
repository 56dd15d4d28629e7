"""How long training runs and at which learning rate: the official schedule, fixed or ended by a plateau.

The official schedule (B7 made it a pure function of the epoch): a linear warm-up over the first 12 %
of ``epochs``, the learning rate x0.33 at 70 % and again at 90 % (``stop="schedule"``). ``stop="plateau"``
(ours) lets the held-out good images' NLL say where the 70 % mark is, and keeps the proportions after
it: it can only shorten the official schedule. Why and how: docs/choices.md, "Training length".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from msflow.config import TrainConfig


def plateau_reached(values: list[float], cfg: TrainConfig) -> bool:
    """Whether the held-out NLL, one value per epoch so far, has reached its plateau: over the last
    ``patience`` epochs the best value improved by less than ``min_improvement`` of the whole improvement
    since the first epoch (scale-free). Nothing is decided during the warm-up (the learning rate rises)."""
    epoch = len(values)
    if epoch < cfg.warmup * cfg.epochs or epoch <= cfg.patience:
        return False
    best = min(values)
    recent_gain = min(values[: epoch - cfg.patience]) - best
    total_gain = values[0] - best
    return recent_gain <= cfg.min_improvement * max(total_gain, 0.0)


@dataclass
class Plateau:
    """The plateau rule's decision (saved in checkpoints; the values it reads are in the history)."""

    decided_at: int | None = None  # epoch p that became the first decay point

    def update(self, values: list[float], cfg: TrainConfig) -> bool:
        """Feed the held-out NLL of every epoch so far; True when the plateau is reached at this epoch.
        The official 70 % mark is the latest point: the rule can shorten the schedule, never lengthen it."""
        if self.decided_at is not None:
            return False
        epoch = len(values)
        if epoch >= round(cfg.decay_at[0] * cfg.epochs) or plateau_reached(values, cfg):
            self.decided_at = epoch
            return True
        return False


def total_epochs(cfg: TrainConfig, plateau: Plateau | None = None) -> int:
    """Epochs the run will take as far as known now (with ``plateau`` undecided: the most allowed)."""
    if cfg.stop == "schedule" or plateau is None or plateau.decided_at is None:
        return cfg.epochs
    return min(cfg.epochs, math.ceil(plateau.decided_at / cfg.decay_at[0] - 1e-9))


def lr_factor(epoch: int, cfg: TrainConfig, plateau: Plateau | None = None) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: linear warm-up times multi-step decay.

    With the defaults this is exactly the official LinearLR(0.1 -> 1, 12) and MultiStepLR([70, 90],
    0.33) over 100 epochs. With ``stop="plateau"`` there is no decay until the plateau epoch p is known;
    the decay points are then p * decay_at[i] / decay_at[0].
    """
    warm, warmup = 1.0, cfg.warmup * cfg.epochs
    if warmup > 0:
        warm = cfg.warmup_from + (1 - cfg.warmup_from) * min(epoch, warmup) / warmup
    if cfg.stop == "schedule":
        milestones = [round(f * cfg.epochs) for f in cfg.decay_at]
    elif plateau is None or plateau.decided_at is None:
        milestones = []
    else:
        milestones = [round(plateau.decided_at * f / cfg.decay_at[0]) for f in cfg.decay_at]
    return warm * cfg.decay_gamma ** sum(epoch >= m for m in milestones)
