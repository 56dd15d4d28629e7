"""The rest of the workflow: multi-category benchmark table, YAML configs, validation thresholds,
the on-disk feature cache, and why EfficientNet-Lite0 features are standardised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import skimage.data
import torch
from fake_data import make_fake_category
from PIL import Image

from msflow.cli import main
from msflow.config import BackboneName, Config, ModelConfig, load_yaml
from msflow.data.datasets import load_dataset
from msflow.errors import ConfigError
from msflow.model.checkpoint import load_tensors
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.features import FeatureCache
from msflow.train.fit import fit

FLAGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--epochs", "1", "--quiet"]


def test_benchmark_writes_a_table_with_a_mean_row_and_survives_a_bad_category(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_fake_category(root / "alpha", seed=1)
    make_fake_category(root / "beta", seed=2)
    broken = make_fake_category(root / "broken", seed=3)
    for f in (broken / "train" / "good").glob("*.png"):
        f.write_bytes(b"")
    out = tmp_path / "bench"
    assert main(["benchmark", "--data", str(root), "--output", str(out), *FLAGS]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in rows] == ["alpha", "beta", "broken", "mean"]
    assert rows[2]["error"] and rows[2]["image_auroc"] is None
    assert rows[3]["image_auroc"] == pytest.approx((rows[0]["image_auroc"] + rows[1]["image_auroc"]) / 2)
    assert (out / "results.md").read_text().count("\n") >= 5 and (out / "results.csv").is_file()


def test_yaml_config_is_used_and_flags_override_it(tmp_path: Path) -> None:
    data = make_fake_category(tmp_path / "fake")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "model:\n  backbone: resnet18\n  pretrained: false\n  image_size: 96\ntrain:\n  epochs: 3\n"
    )
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(data),
        "--output",
        str(run),
        "--config",
        str(cfg_file),
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0
    saved = load_yaml(run / "config.yaml")
    assert saved.model.backbone == "resnet18" and saved.model.image_size == 64 and saved.train.epochs == 1


def test_unknown_or_bad_config_values_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\n  blocks: 3\n")
    with pytest.raises(ConfigError, match="blocks"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="clamp"):
        ModelConfig(clamp="tanh")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="image_size"):
        Config().updated(model={"image_size": 100})


def test_validation_folder_gives_f1_thresholds(tmp_path: Path) -> None:
    data = make_fake_category(tmp_path / "fake")
    val = make_fake_category(tmp_path / "val", seed=5)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), "--validation", str(val), *FLAGS]) == 0
    threshold = json.loads((run / "model.json").read_text())["threshold"]
    assert threshold["method"] == "validation-f1" and np.isfinite(threshold["pixel"])


def test_disk_cache_trains_exactly_like_the_memory_cache(tmp_path: Path) -> None:
    data = make_fake_category(tmp_path / "fake")
    results = {}
    for where in ("memory", "disk"):
        cfg = Config().updated(
            model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
            data={"dataset": str(data)},
            train={"epochs": 2, "cache": where},
        )
        results[where] = fit(cfg, tmp_path / where, progress=False, log=lambda _: None)
    # The trained weights themselves, bit for bit (metrics of 6 images could agree by chance).
    memory, _ = load_tensors(tmp_path / "memory" / "model")
    disk, _ = load_tensors(tmp_path / "disk" / "model")
    assert memory.keys() == disk.keys()
    assert all(torch.equal(memory[k], disk[k]) for k in memory)
    # ... and "disk" really is on disk: the cache holds memory-mapped files.
    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64))
    _, train, _ = load_dataset(str(data))
    cache = FeatureCache.build(model, train, torch.device("cpu"), where="disk", progress=False)
    assert all(isinstance(a, np.memmap) for a in cache.arrays)


def test_lite0_features_need_standardising() -> None:
    """Raw EfficientNet-Lite0 stage outputs are large and un-activated: through the official flows the
    initial NLL is orders of magnitude above that of standardised features, and the per-image maps
    saturate (every image scores exactly 1)."""
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    images = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.fromarray(p).resize((128, 128)))).permute(2, 0, 1)
                for p in photos
            ]
        ).float()
        / 255
    )
    losses, scores = {}, {}
    for norm in ("none", "channel"):
        model = MSFlow(ModelConfig(backbone="efficientnet_lite0", image_size=128, feature_norm=norm))
        model.fit_standardization([model.extract(images)])
        with torch.no_grad():
            out = model(images)
            losses[norm] = nll(out.zs, out.log_det).mean().item()
            scores[norm] = model.anomaly(out.zs).scores
    assert losses["none"] > 50 * abs(losses["channel"])
    assert torch.all(scores["none"] > 0.999)  # saturated: the ranking is lost
    assert scores["channel"].std() > 1e-3


def test_feature_norm_auto_standardises_every_lite_and_no_resnet() -> None:
    """Lite1/Lite2 have Lite0's un-activated stage outputs, so ``auto`` must standardise them too."""
    auto = {name: ModelConfig(backbone=name).standardize_features for name in get_args(BackboneName)}
    assert auto == {
        "wide_resnet50_2": False,
        "resnet18": False,
        "efficientnet_lite0": True,
        "efficientnet_lite1": True,
        "efficientnet_lite2": True,
    }
