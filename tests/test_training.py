"""Training faults, crash safety, safe loading and determinism (tiny fake data, random ResNet-18)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_data import make_fake_category

from msflow.config import Config, TrainConfig
from msflow.errors import CheckpointError, TrainingError
from msflow.model.checkpoint import load_model, load_tensors
from msflow.train.fit import fit
from msflow.train.loop import lr_factor

TIMING_KEYS = {"train_seconds", "feature_extraction_seconds", "test_images_per_second", "model_build_seconds"}


def tiny_config(data: Path, epochs: int = 3, **train: object) -> Config:
    return Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        data={"dataset": str(data)},
        train={"epochs": epochs, "batch_size": 4, **train},
    )


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_category(tmp_path_factory.mktemp("train") / "fake", n_train=12)


def test_schedule_matches_the_official_one() -> None:
    cfg = TrainConfig(stop="schedule")  # 100 epochs: LinearLR(0.1 -> 1, 12), x0.33 at 70 and 90, per epoch
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(1, cfg) == pytest.approx(0.175)
    assert lr_factor(12, cfg) == pytest.approx(1.0)
    assert lr_factor(69, cfg) == pytest.approx(1.0)
    assert lr_factor(70, cfg) == pytest.approx(0.33)
    assert lr_factor(90, cfg) == pytest.approx(0.33**2)


def test_same_seed_gives_identical_metrics(data: Path, tmp_path: Path) -> None:
    a = fit(tiny_config(data), tmp_path / "a", progress=False, log=lambda _: None)
    b = fit(tiny_config(data), tmp_path / "b", progress=False, log=lambda _: None)
    assert comparable(a) == comparable(b)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_a_non_finite_batch_is_survived(data: Path, tmp_path: Path) -> None:
    injected = []

    def poison_once(epoch: int, step: int, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if epoch == 1 and step == 1 and not injected:
            injected.append(True)
            return [f.clone().fill_(float("nan")) for f in feats]
        return feats

    metrics = fit(
        tiny_config(data), tmp_path / "run", progress=False, step_hook=poison_once, log=lambda _: None
    )
    assert injected and metrics["epochs"] == 3 and math.isfinite(metrics["image_auroc"])
    _, meta = load_tensors(tmp_path / "run" / "checkpoint" / "last")
    assert meta["bad_events"] == 1 and meta["lr_scale"] == 0.5
    tensors, _ = load_tensors(tmp_path / "run" / "model")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_persistent_non_finite_loss_stops_with_a_clear_error(data: Path, tmp_path: Path) -> None:
    def poison(epoch: int, step: int, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f * float("inf") for f in feats]

    with pytest.raises(TrainingError, match="non-finite"):
        fit(
            tiny_config(data, max_bad_steps=3),
            tmp_path / "run",
            progress=False,
            step_hook=poison,
            log=lambda _: None,
        )
    assert not (tmp_path / "run" / "checkpoint" / "last.json").exists()  # no checkpoint ever holds NaN


def test_sigkill_then_resume_gives_the_same_result(data: Path, tmp_path: Path) -> None:
    epochs = 8
    reference = fit(tiny_config(data, epochs), tmp_path / "reference", progress=False, log=lambda _: None)
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "msflow",
        "train",
        "--data",
        str(data),
        "--output",
        str(run),
        "--backbone",
        "resnet18",
        "--no-pretrained",
        "--image-size",
        "64",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoint" / "last.json"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                epoch = json.loads(last.read_text())["epoch"]
            except (json.JSONDecodeError, KeyError):  # never happens with atomic writes; be safe
                epoch = 0
            if 1 <= epoch < epochs - 1:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    if killed_at is None:
        pytest.skip("training finished before it could be killed (machine too fast for this test)")
    assert not (run / "model.json").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((run / "metrics.json").read_text())
    assert comparable(got) == comparable(json.loads(json.dumps(reference)))


def test_checkpoints_refuse_truncation_tampering_and_other_versions(data: Path, tmp_path: Path) -> None:
    fit(tiny_config(data, epochs=1), tmp_path / "run", progress=False, log=lambda _: None)
    model, cfg, meta = load_model(tmp_path / "run")
    assert cfg.model.backbone == "resnet18"
    weights, meta_path = tmp_path / "run" / "model.safetensors", tmp_path / "run" / "model.json"
    original = weights.read_bytes()

    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_model(tmp_path / "run")

    tampered = bytearray(original)
    tampered[-10] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_model(tmp_path / "run")

    weights.write_bytes(original)
    text = meta_path.read_text()
    meta_path.write_text(text.replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(CheckpointError, match="incompatible version"):
        load_model(tmp_path / "run")

    meta_path.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="truncated or not JSON"):
        load_model(tmp_path / "run")


def test_resume_without_checkpoint_is_an_error(tmp_path: Path, data: Path) -> None:
    from msflow.errors import MSFlowError

    with pytest.raises(MSFlowError, match="nothing to resume"):
        fit(tiny_config(data), tmp_path / "none", resume=True, progress=False)


def test_short_schedules_warm_up_and_decay_at_the_same_relative_points() -> None:
    cfg = TrainConfig(epochs=10, stop="schedule")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(2, cfg) == pytest.approx(1.0)  # warm-up ends at 1.2 epochs
    assert lr_factor(7, cfg) == pytest.approx(0.33)
    assert lr_factor(9, cfg) == pytest.approx(0.33**2)


def test_cpu_bf16_loss_stays_close_to_float32() -> None:
    """The design guide's AMP rule: the reduced-precision loss matches float32 within a stated tolerance."""
    from msflow.config import ModelConfig
    from msflow.model.loss import nll
    from msflow.model.msflow import MSFlow

    torch.manual_seed(0)
    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))
    feats = [torch.randn(4, *s) for s in model.feature_shapes]
    out = model.flow(feats)
    reference = nll(out.zs, out.log_det).mean().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.flow(feats)
    low = nll([z.float() for z in out.zs], out.log_det.float()).mean().item()
    assert abs(low - reference) <= 1e-3 * abs(reference)


def test_cpu_bf16_training_runs_and_learns(data: Path, tmp_path: Path) -> None:
    metrics = fit(
        tiny_config(data, epochs=2, cpu_bf16=True), tmp_path / "bf16", progress=False, log=lambda _: None
    )
    _, meta = load_tensors(tmp_path / "bf16" / "checkpoint" / "last")
    assert meta["history"][1]["loss"] < meta["history"][0]["loss"] and math.isfinite(metrics["image_auroc"])
