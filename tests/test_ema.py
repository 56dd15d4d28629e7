"""The opt-in moving average of the flows' weights (``--ema``): its arithmetic, where it is updated,
that it is what a run saves, that checkpoints carry it, and that it is off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_fake_category

from msflow.config import Config, ModelConfig, TrainConfig
from msflow.errors import ConfigError, MSFlowError
from msflow.model.checkpoint import load_tensors
from msflow.model.msflow import MSFlow
from msflow.train.features import FeatureCache
from msflow.train.fit import fit
from msflow.train.loop import FlowAverage, TrainState, make_average, make_optimizer, train_flows
from msflow.train.resume import load_training_state, save_training_state


def tiny_model() -> MSFlow:
    return MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))


def flow_weights(model: MSFlow) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.trainable_parameters()]


def test_two_updates_give_the_hand_computed_average() -> None:
    model, decay = tiny_model(), 0.9
    average = FlowAverage(model, decay)
    params = model.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
        average.update()  # the first update copies the weights
        for p in params:
            p.fill_(3.0)
        average.update()
    average.copy_to_model()
    expected = decay * 1.0 + (1 - decay) * 3.0
    assert all(torch.allclose(p, torch.full_like(p, expected)) for p in params)


def test_the_average_follows_every_optimizer_step() -> None:
    torch.manual_seed(0)
    model, decay = tiny_model(), 0.8
    shapes = model.feature_shapes
    cache = FeatureCache([np.random.default_rng(i).standard_normal((6, *s), dtype=np.float32) for i, s in
                          enumerate(shapes)])  # fmt: skip
    cfg = TrainConfig(epochs=2, batch_size=2, ema=decay)
    seen: list[list[torch.Tensor]] = []  # the weights before each step = after the step before it

    def record(epoch: int, step: int, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(flow_weights(model))
        return feats

    average = make_average(model, cfg)
    optimizer = make_optimizer(model.trainable_parameters(), cfg.lr, torch.device("cpu"))
    train_flows(model, cache, cfg, torch.device("cpu"), TrainState(), optimizer, step_hook=record,
                progress=False, average=average)  # fmt: skip
    after = [*seen[1:], flow_weights(model)]  # the weights after each of the 6 steps
    assert len(after) == 6
    expected = after[0]
    for weights in after[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    average.copy_to_model()
    for got, want in zip(model.trainable_parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(g, w) for g, w in zip(model.trainable_parameters(), after[-1], strict=True))


def test_off_by_default_and_checked() -> None:
    assert TrainConfig().ema == 0.0 and make_average(tiny_model(), TrainConfig()) is None
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="ema"):
            TrainConfig(ema=bad)


def test_checkpoints_carry_the_average(tmp_path: Path) -> None:
    model = tiny_model()
    average = FlowAverage(model, 0.5)
    optimizer = make_optimizer(model.trainable_parameters(), 1e-4, torch.device("cpu"))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    average.update()
    cfg = Config()
    save_training_state(tmp_path, model, optimizer, cfg, TrainState(), {}, average)
    other = tiny_model()
    restored = FlowAverage(other, 0.5)
    load_training_state(tmp_path, other, optimizer, restored)
    for a, b in zip(average.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    save_training_state(tmp_path, model, optimizer, cfg, TrainState(), {})  # a run without --ema
    with pytest.raises(MSFlowError, match="no averaged weights"):
        load_training_state(tmp_path, other, optimizer, restored)


def test_a_run_saves_the_averaged_weights(tmp_path: Path) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=8)
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        data={"dataset": str(data)},
        train={"epochs": 2, "batch_size": 4, "ema": 0.7},
    )
    fit(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    saved, _ = load_tensors(tmp_path / "run" / "model")
    last, _ = load_tensors(tmp_path / "run" / "checkpoint" / "last")
    names = {"0": "parallel_flows", "1": "fusion_flow"}  # FlowAverage's ModuleList of the two
    averaged = {
        names[k.split(".")[2]] + k[len("ema.module.0") :]: v
        for k, v in last.items()
        if k.startswith("ema.module.")
    }
    flows = [k for k in averaged if k in saved and averaged[k].is_floating_point()]
    assert flows and all(torch.equal(saved[k], averaged[k]) for k in flows)
    raw = {k[len("model.") :]: v for k, v in last.items() if k.startswith("model.")}
    assert any(not torch.equal(raw[k], averaged[k]) for k in flows)  # the saved model is not the last step
