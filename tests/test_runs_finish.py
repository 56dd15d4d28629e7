"""Runs that finish: a model saved before its evaluation, runs finished by ``msflow test`` or
``--resume``, good-images-only folders, ``msflow predict`` resumed after a crash, and a feature cache on
disk read one batch at a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_fake_category
from PIL import Image

from msflow.cli import main
from msflow.evaluate import report

FLAGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finish")
    data = make_fake_category(root / "fake")
    run = root / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *FLAGS]) == 0
    return data, run


def test_run_killed_during_evaluation_is_finished_by_test_and_by_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import msflow.infer.evaluate_run as evaluate_run
    import msflow.train.fit as fit_module

    data = make_fake_category(tmp_path / "fake")
    run = tmp_path / "run"

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed during the test evaluation")

    with monkeypatch.context() as m:
        m.setattr(evaluate_run, "evaluate_stream", killed)
        with pytest.raises(RuntimeError, match="killed"):
            main(["train", "--data", str(data), "--output", str(run), *FLAGS])
    # The trained model survived, with its threshold; the report did not get written.
    meta = json.loads((run / "model.json").read_text())
    assert "threshold" in meta and meta["training"]["epochs"] == 1 and "metrics" not in meta
    assert not (run / "metrics.json").exists()

    # `msflow test --model RUN` finishes the run in place.
    assert main(["test", "--model", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "holdout_false_positive_rate"} <= set(metrics)
    assert metrics["epochs"] == 1 and metrics["eval_resolution"] == "original"
    assert (run / "predictions.csv").is_file() and (run / "score_histogram.png").is_file()
    assert len(list((run / "overlays").glob("*.png"))) == 6
    assert json.loads((run / "model.json").read_text())["metrics"]["aupro"] == metrics["aupro"]

    # `msflow train --resume` on a trained run evaluates only: no features, no training.
    (run / "metrics.json").unlink()
    with monkeypatch.context() as m:
        m.setattr(fit_module.FeatureCache, "build", killed)
        m.setattr(fit_module, "train_flows", killed)
        assert main(["train", "--data", str(data), "--output", str(run), "--resume", *FLAGS]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["aupro"] == metrics["aupro"] and again["image_auroc"] == metrics["image_auroc"]
    assert "image AUROC" in capsys.readouterr().out


def test_good_images_only_folder_gives_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=12, n_good=3, n_bad=0)
    shutil.rmtree(data / "test")  # train/good alone
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *FLAGS]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "held-out FPR" in out and "Traceback" not in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        "image_auroc" not in metrics and "0 good and 0 defective" in metrics["not_available"]["image_auroc"]
    )
    assert metrics["holdout_images"] == 1 and 0 <= metrics["holdout_false_positive_rate"] <= 100
    assert (run / "model.safetensors").is_file()

    # A test set of good images only: the false-positive rate instead of the two-class metrics.
    good_only = make_fake_category(tmp_path / "good_only", n_good=5, n_bad=0, seed=4)
    assert main(["test", "--model", str(run), "--data", str(good_only), "--output", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert "5 good and 0 defective" in metrics["not_available"]["image_auroc"]
    rows = list(report.read_rows(tmp_path / "t" / "predictions.csv"))
    flagged = sum(r["decision"] == "defective" for r in rows)
    assert metrics["false_positive_rate"] == pytest.approx(100 * flagged / 5)
    assert "test FPR" in capsys.readouterr().out


def test_eval_resolution_model_is_recorded(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    original = json.loads((run / "metrics.json").read_text())
    argv = ["test", "--model", str(run), "--data", str(data), "--output", str(tmp_path), "--quiet"]
    assert main([*argv, "--eval-resolution", "model"]) == 0
    at_model = json.loads((tmp_path / "metrics.json").read_text())
    assert original["eval_resolution"] == "original" and at_model["eval_resolution"] == "model"
    assert at_model["image_auroc"] == original["image_auroc"]  # scores do not depend on it
    assert at_model["pixel_auroc"] != original["pixel_auroc"]  # 64 px maps vs 48 px masks


def _inputs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return sorted(folder.glob("*.png"))


def _assert_each_once(out: Path, images: list[Path]) -> None:
    rows = list(report.read_rows(out / "predictions.csv"))
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in images)


def test_predict_crash_then_resume_gives_every_image_once(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msflow.infer.predictor import Predictor

    _, run = trained
    images = _inputs(tmp_path / "in", 20)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(run), "--input", str(tmp_path / "in"), "--output", str(out), "--quiet"]
    real, calls = Predictor.predict_images, []

    def crash_on_third_batch(self: Predictor, batch: list) -> list:
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("crash")
        return real(self, batch)

    with monkeypatch.context() as m:
        m.setattr(Predictor, "predict_images", crash_on_third_batch)
        with pytest.raises(RuntimeError, match="crash"):
            main([*argv, "--batch-size", "4"])
    assert len(list(report.read_rows(out / "predictions.csv"))) == 8  # the finished batches were kept
    with (out / "predictions.csv").open("a") as fh:  # and a row cut short by a kill mid-write
        fh.write(f"{images[-1]},0.1,0.2")
    assert main([*argv, "--resume"]) == 0
    _assert_each_once(out, images)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 20 and summary["skipped"] == 8 and summary["failed"] == 0


def test_predict_killed_by_sigkill_then_resumed(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained
    images = _inputs(tmp_path / "in", 40)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "msflow", "predict", "--model", str(run), "--input", str(tmp_path / "in")]
    argv += ["--output", str(out), "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(argv, env=os.environ.copy())
    csv_file, deadline = out / "predictions.csv", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if csv_file.is_file() and csv_file.read_bytes().count(b"\n") >= 6:  # header + 5 rows
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done = len(list(report.read_rows(csv_file)))
    if proc.returncode != -signal.SIGKILL:
        pytest.skip(f"predict finished before it could be killed ({done} rows)")
    assert 5 <= done < 40
    assert main([*argv[3:], "--resume"]) == 0
    _assert_each_once(out, images)


def test_disk_cache_is_chosen_from_real_sizes_and_read_one_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msflow.config import ModelConfig, TrainConfig
    from msflow.data.datasets import parse_folder
    from msflow.model.msflow import MSFlow
    from msflow.train import features
    from msflow.train.features import FeatureCache, cache_location
    from msflow.train.loop import TrainState, train_flows

    assert cache_location(39, 100) == "memory" and cache_location(41, 100) == "disk"
    train, _ = parse_folder(make_fake_category(tmp_path / "fake", n_train=10))
    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))
    need = len(train) * sum(c * h * w for c, h, w in model.feature_shapes) * 4

    class Memory:  # what psutil would say on a machine where the features need half the free RAM
        available = 2 * need

    monkeypatch.setattr(features.psutil, "virtual_memory", lambda: Memory())
    cache = FeatureCache.build(model, train, torch.device("cpu"), 4, "auto", progress=False)
    assert all(isinstance(a, np.memmap) for a in cache.arrays)

    class CountingReads:  # the arrays as training sees them, counting the rows of every read
        def __init__(self, array: np.ndarray) -> None:
            self.array, self.reads = array, []

        def __len__(self) -> int:
            return len(self.array)

        def __getitem__(self, index: np.ndarray) -> np.ndarray:
            self.reads.append(len(index))
            return self.array[index]

    cache.arrays = [CountingReads(a) for a in cache.arrays]
    cfg = TrainConfig(epochs=1, batch_size=4)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr)
    train_flows(model, cache, cfg, torch.device("cpu"), TrainState(), optimizer, progress=False)
    for counted in cache.arrays:
        assert max(counted.reads) <= 4 and sum(counted.reads) == len(train)  # batches, each row once
        assert isinstance(counted.array, np.memmap)  # never swapped for an in-memory copy
