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
from msflow.train.schedule import Plateau, lr_factor, total_epochs


def feed(plateau: Plateau, values: list[float], cfg: TrainConfig) -> int | None:
    for epoch, value in enumerate(values, start=1):
        if plateau.update(epoch, value, cfg):
            return epoch
    return None


def test_plateau_is_decided_after_patience_epochs_without_improvement() -> None:
    cfg = TrainConfig(epochs=100, patience=3, min_delta=0.01)
    # Warm-up ends at 12 epochs; improvements of 0.1 per epoch until epoch 20, then only 0.001.
    values = [1.0 - 0.1 * e for e in range(1, 21)] + [-1.0 - 0.001 * e for e in range(1, 30)]
    plateau = Plateau()
    assert feed(plateau, values, cfg) == 23  # best at 20, three epochs without a 0.01 gain
    assert plateau.best_epoch == 20
    assert total_epochs(cfg, plateau) == math.ceil(23 / 0.7)  # 33: p is the 70 % mark
    # The decays sit where the official schedule has them relative to the end: p and p * 0.9 / 0.7.
    assert lr_factor(22, cfg, plateau) == pytest.approx(1.0)
    assert lr_factor(23, cfg, plateau) == pytest.approx(0.33)
    assert lr_factor(29, cfg, plateau) == pytest.approx(0.33)
    assert lr_factor(30, cfg, plateau) == pytest.approx(0.33**2)  # round(23 * 9 / 7) = 30


def test_nothing_is_decided_during_the_warm_up() -> None:
    cfg = TrainConfig(epochs=100, patience=2, min_delta=0.01)
    plateau = Plateau()
    assert feed(plateau, [1.0] * 12, cfg) == 12  # flat from the start, but the warm-up runs to epoch 12
    assert lr_factor(5, cfg, plateau) == pytest.approx(0.1 + 0.9 * 5 / 12)


def test_without_a_plateau_the_schedule_is_the_official_one() -> None:
    cfg = TrainConfig(epochs=100, patience=5, min_delta=0.0)
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
    # min_delta so large that no epoch counts as an improvement after the first: decided at epoch 2
    # (the warm-up is 0.1 x 20 = 2 epochs), so the run ends after ceil(2 / 0.7) = 3 of at most 20 epochs.
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        data={"dataset": str(data), "holdout_fraction": 0.34},
        train={"epochs": 20, "batch_size": 4, "warmup": 0.1, "patience": 1, "min_delta": 1e9},
    )
    fit(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert all(math.isfinite(e["holdout_nll"]) for e in log)
    assert log[1]["plateau_at"] == 2 and log[1]["schedule_epochs"] == 3
    assert log[2]["lr"] == pytest.approx(1e-4 * 0.33)  # warm-up over, first decay at p = 2
    training = json.loads((tmp_path / "run" / "model.json").read_text())["training"]
    assert training["epochs"] == 3 and training["stop"] == "plateau"
    assert training["plateau"]["decided_at"] == 2
