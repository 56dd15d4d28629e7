"""The training schedule: official when fixed, and its length decided by the held-out NLL plateau."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fake_data import make_fake_category

from msflow.config import Config, ModelConfig, TrainConfig
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.features import FeatureCache
from msflow.train.fit import fit
from msflow.train.loop import holdout_nll
from msflow.train.schedule import Plateau, lr_factor, plateau_reached, total_epochs


def feed(plateau: Plateau, values: list[float], cfg: TrainConfig) -> int | None:
    for epoch in range(1, len(values) + 1):
        if plateau.update(values[:epoch], cfg):
            return epoch
    return None


def test_plateau_by_hand() -> None:
    cfg = TrainConfig(epochs=100, stop="plateau", patience=3, min_improvement=0.01)
    # Held-out NLL falls by 0.1 per epoch until epoch 20 (from 1.0 to -0.9), then by 0.002 per epoch.
    values = [1.0 - 0.1 * (e - 1) for e in range(1, 21)] + [-0.9 - 0.002 * e for e in range(1, 30)]
    # At epoch e > 20 the window gain is 0.006 (3 x 0.002) unless it reaches back before epoch 21;
    # the whole gain is 1.9 + 0.002 (e - 20): 0.006 <= 1 % of it from the first epoch where the window
    # lies after epoch 20, i.e. epoch 23 (gain 1.906 x 0.01 = 0.019 > 0.006).
    plateau = Plateau()
    assert feed(plateau, values, cfg) == 23
    assert total_epochs(cfg, plateau) == math.ceil(23 / 0.7)  # 33: p is the 70 % mark
    # The decays sit where the official schedule has them relative to the end: p and p * 0.9 / 0.7.
    assert lr_factor(22, cfg, plateau) == pytest.approx(1.0)
    assert lr_factor(23, cfg, plateau) == pytest.approx(0.33)
    assert lr_factor(29, cfg, plateau) == pytest.approx(0.33)
    assert lr_factor(30, cfg, plateau) == pytest.approx(0.33**2)  # round(23 * 9 / 7) = 30


def test_plateau_reached_is_scale_free() -> None:
    cfg = TrainConfig(epochs=100, stop="plateau", patience=3, min_improvement=0.01)
    values = [5.0 - 4.0 * (1 - 0.8**e) for e in range(40)]  # geometric approach to 1.0
    shifted = [1000 * v - 77 for v in values]  # another backbone: other units, other offset
    assert [plateau_reached(values[:e], cfg) for e in range(1, 41)] == [
        plateau_reached(shifted[:e], cfg) for e in range(1, 41)
    ]
    assert plateau_reached(values, cfg)
    # Rising held-out NLL (over-fitting) is a plateau as soon as the window has no new best.
    assert plateau_reached([1.0, 0.5, 0.2] + [0.1] * 10 + [0.15, 0.2, 0.25], cfg)


def test_nothing_is_decided_during_the_warm_up() -> None:
    cfg = TrainConfig(epochs=100, stop="plateau", patience=2)
    plateau = Plateau()
    assert feed(plateau, [1.0] * 12, cfg) == 12  # flat from the start, but the warm-up runs to epoch 12
    assert lr_factor(5, cfg, plateau) == pytest.approx(0.1 + 0.9 * 5 / 12)


def test_without_a_plateau_the_schedule_is_the_official_one() -> None:
    cfg = TrainConfig(epochs=100, stop="plateau", patience=5, min_improvement=0.0)
    plateau = Plateau()
    assert feed(plateau, [-float(e) for e in range(1, 101)], cfg) == 70  # the latest decision point
    official = TrainConfig(epochs=100, stop="schedule")
    assert total_epochs(cfg, plateau) == 100
    assert [lr_factor(e, cfg, plateau) for e in range(100)] == pytest.approx(
        [lr_factor(e, official) for e in range(100)]
    )


def test_schedule_mode_ignores_the_plateau() -> None:
    cfg = TrainConfig(epochs=40, stop="schedule")
    plateau = Plateau(decided_at=10)
    assert total_epochs(cfg, plateau) == 40
    assert lr_factor(12, cfg, plateau) == lr_factor(12, cfg)


def test_holdout_nll_is_the_mean_nll_per_latent_dimension() -> None:
    torch.manual_seed(0)
    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))
    feats = [torch.randn(5, *s) for s in model.feature_shapes]
    cache = FeatureCache([f.numpy() for f in feats])
    with torch.no_grad():
        out = model.flow(feats)
        expected = nll(out.zs, out.log_det).mean().item() / sum(f[0].numel() for f in feats)
    assert holdout_nll(model, cache, torch.device("cpu"), batch_size=2) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_category(tmp_path_factory.mktemp("schedule") / "fake", n_train=12)


def test_a_plateau_ends_training_early_and_is_recorded(data: Path, tmp_path: Path) -> None:
    # min_improvement so large that any window counts as a plateau once it does not reach back to the
    # first epoch: decided at epoch 3 (warm-up 0.1 x 20 = 2 epochs, window 1), so the run ends after
    # ceil(3 / 0.7) = 5 of at most 20 epochs, with the decays at epochs 3 and round(3 x 9 / 7) = 4.
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        data={"dataset": str(data), "holdout_fraction": 0.34},
        train={
            **{"epochs": 20, "batch_size": 4, "warmup": 0.1, "stop": "plateau"},
            **{"patience": 1, "min_improvement": 0.99},
        },
    )
    fit(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(e["holdout_nll"]) for e in log)
    assert log[2]["plateau_at"] == 3 and log[2]["schedule_epochs"] == 5
    assert [e["lr"] for e in log[2:]] == pytest.approx([1e-4, 1e-4 * 0.33, 1e-4 * 0.33**2])
    training = json.loads((tmp_path / "run" / "model.json").read_text())["training"]
    assert training["epochs"] == 5 and training["stop"] == "plateau"
    assert training["plateau"]["decided_at"] == 3
