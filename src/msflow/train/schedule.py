"""How long training runs and at which learning rate: the official schedule, fixed or ended by a plateau.

The official schedule (B7 made it a pure function of the epoch): a linear warm-up over the first 12 %
of 100 epochs, then the learning rate constant until 70 %, multiplied by 0.33 there and again at 90 %.

``stop="schedule"`` runs it for exactly ``epochs`` epochs (``warmup`` and ``decay_at`` are fractions of
``epochs``, so a shorter schedule warms up and decays at the same relative points).

``stop="plateau"`` (ours) lets the data decide where the 70 % mark is. After the warm-up, the mean
negative log-likelihood of the good images held out from training (never trained on, no test image,
no label) is measured after every epoch; when it has not improved by ``min_delta`` nats per dimension
for ``patience`` epochs, that epoch *p* becomes the first decay point, and the rest of the official
schedule follows at the same proportions (second decay at p * 0.9/0.7, end at p / 0.7). Without a
plateau, p is the official 70 % of ``epochs``: the rule can only shorten the official schedule.
The decision is recorded in ``train_log.jsonl`` and ``model.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from msflow.config import TrainConfig


def warmup_epochs(cfg: TrainConfig) -> float:
    """Warm-up length in epochs: a fraction of ``epochs`` (with ``plateau``, of the most epochs)."""
    return cfg.warmup * cfg.epochs


@dataclass
class Plateau:
    """State of the plateau rule (saved in checkpoints, so a resumed run decides identically)."""

    best: float | None = None  # lowest held-out NLL (nats per dimension) so far
    best_epoch: int = 0
    decided_at: int | None = None  # epoch p that became the first decay point

    def update(self, epoch: int, holdout_nll: float, cfg: TrainConfig) -> bool:
        """Record the held-out NLL after ``epoch`` (1-based epochs done); True when the plateau is reached
        at this epoch. Before the warm-up ends nothing is decided (the learning rate is still rising)."""
        if self.decided_at is not None:
            return False
        if self.best is None or holdout_nll < self.best - cfg.min_delta:
            self.best, self.best_epoch = holdout_nll, epoch
        # The official 70 % mark is the latest point: the rule can shorten the schedule, never lengthen it.
        latest = epoch >= round(cfg.decay_at[0] * cfg.epochs)
        if not latest and (epoch < warmup_epochs(cfg) or epoch - self.best_epoch < cfg.patience):
            return False
        self.decided_at = epoch
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Plateau:
        return cls(**d) if d else cls()


def total_epochs(cfg: TrainConfig, plateau: Plateau | None = None) -> int:
    """Epochs the run will take as far as known now (with ``plateau`` undecided: the most allowed)."""
    if cfg.stop == "schedule" or plateau is None or plateau.decided_at is None:
        return cfg.epochs
    return min(cfg.epochs, math.ceil(plateau.decided_at / cfg.decay_at[0] - 1e-9))


def lr_factor(epoch: int, cfg: TrainConfig, plateau: Plateau | None = None) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: linear warm-up times multi-step decay.

    The official code steps LinearLR(0.1 -> 1, 12 sub-epochs) and MultiStepLR([70, 90], 0.33) once per
    sub-epoch; with ``warmup`` = 0.12 and ``decay_at`` = (0.7, 0.9) of 100 epochs this reproduces it
    exactly. With ``stop="plateau"`` there is no decay until the plateau epoch p is known; the decay
    points are then p * decay_at[i] / decay_at[0].
    """
    warm = 1.0
    if warmup_epochs(cfg) > 0:
        warm = cfg.warmup_from + (1 - cfg.warmup_from) * min(epoch, warmup_epochs(cfg)) / warmup_epochs(cfg)
    if cfg.stop == "schedule":
        milestones = [round(f * cfg.epochs) for f in cfg.decay_at]
    elif plateau is None or plateau.decided_at is None:
        milestones = []
    else:
        milestones = [round(plateau.decided_at * f / cfg.decay_at[0]) for f in cfg.decay_at]
    return warm * cfg.decay_gamma ** sum(epoch >= m for m in milestones)


__all__ = ["Plateau", "lr_factor", "total_epochs", "warmup_epochs"]
