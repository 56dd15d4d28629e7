"""``--budget MINUTES``: the epochs that fit, the accuracy cost it prints, and that a run honours it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fake_data import make_fake_category

from msflow.config import Config, TrainConfig
from msflow.errors import ConfigError
from msflow.model.msflow import MSFlow
from msflow.train import budget
from msflow.train.features import FeatureCache
from msflow.train.fit import fit


def test_epochs_that_fit_are_whole_and_bounded() -> None:
    assert budget.epochs_for_budget(35.0, 10.0, most=100) == 3
    assert budget.epochs_for_budget(5.0, 10.0, most=100) == 1  # at least one epoch
    assert budget.epochs_for_budget(1e6, 10.0, most=40) == 40  # never more than --epochs


def test_plan_leaves_room_for_what_was_spent_and_the_evaluation() -> None:
    cost = budget.EpochCost(per_image=0.1, fixed=2.0)  # 100 images: 12 s per epoch
    # 10 min = 600 s; 60 s spent; evaluation 2 x 0.5 s x 120 images = 120 s; 420 s left: 35 epochs.
    p = budget.plan(10, 60.0, cost, 100, 120, 0.5, most=100)
    assert p["epochs"] == 35 and p["fits"]
    assert p["expected_total_minutes"] == pytest.approx((60 + 120 + 35 * 12) / 60, abs=0.01)
    tight = budget.plan(1, 60.0, cost, 100, 120, 0.5, most=100)
    assert tight["epochs"] == 1 and not tight["fits"]


def test_expected_cost_reads_the_measured_curve() -> None:
    at_full = budget.expected_cost(100)
    assert all("(+0.00)" in line and "(-" not in line for line in at_full)
    mt, image10, image100 = (
        "magnetic_tile",
        *[budget.ACCURACY_CURVE["magnetic_tile"][e][0] for e in (10, 100)],
    )
    line = next(line for line in budget.expected_cost(10) if line.startswith(mt))
    assert f"image AUROC {image10:.2f} vs {image100:.2f} ({image10 - image100:+.2f})" in line
    # Between measured points: linear in the epochs.
    bs = budget.ACCURACY_CURVE["bsdata"]
    mid = bs[25][0] + (bs[100][0] - bs[25][0]) * 25 / 75
    assert f"image AUROC {mid:.2f}" in next(x for x in budget.expected_cost(50) if x.startswith("bsdata"))


def test_measuring_leaves_the_model_and_random_state_alone() -> None:
    from msflow.config import ModelConfig

    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))
    with torch.no_grad():
        feats = model.extract(torch.rand(16, 3, 64, 64))
    cache = FeatureCache([f.numpy() for f in feats])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cost = budget.measure_epoch_cost(model, cache, TrainConfig(batch_size=4), torch.device("cpu"))
    assert cost.per_image > 0 and cost.fixed >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_budget_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(budget=0)


@pytest.mark.parametrize(("minutes", "most"), [(1e-3, 5), (1e3, 2)])
def test_a_run_trains_the_epochs_its_budget_allows(tmp_path: Path, minutes: float, most: int) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=12)
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        data={"dataset": str(data)},
        train={"epochs": most, "batch_size": 4, "budget": minutes},
    )
    lines: list[str] = []
    fit(cfg, tmp_path / "run", progress=False, log=lines.append)
    decided = json.loads((tmp_path / "run" / "budget.json").read_text())
    expected = 1 if minutes < 1 else most  # far too little: one epoch; plenty: all of --epochs
    assert decided["epochs"] == expected
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == expected and saved["train"]["budget"] is None
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == expected
    assert any(line.startswith(f"budget {minutes:g} min") for line in lines)
    assert any(line.strip().startswith("magnetic_tile") for line in lines)
