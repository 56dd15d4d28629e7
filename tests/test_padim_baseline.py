"""benchmarks/padim_baseline.py: the Lite0 weights renamed for timm, and (where anomalib is installed)
PaDiM's features equal to msflow's and a whole run on a tiny set."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from fake_data import make_fake_category

from msflow.model.backbone import FeatureExtractor


def test_lite0_state_is_renamed_in_order_and_shapes_checked(benchmark_module):
    padim = benchmark_module("padim_baseline")
    timm_state = {"conv_stem.weight": torch.zeros(4, 3), "bn1.bias": torch.zeros(4)}
    lite = {
        "_conv_stem.weight": torch.ones(4, 3),
        "_bn0.bias": torch.full((4,), 2.0),
        "_fc.bias": torch.ones(9),
    }
    mapped = padim.timm_lite0_state(timm_state, lite)
    assert list(mapped) == ["conv_stem.weight", "bn1.bias"]  # the head the extractor lacks is left out
    assert mapped["bn1.bias"].eq(2).all() and mapped["conv_stem.weight"].eq(1).all()
    with pytest.raises(ValueError, match="'_bn0.bias' \\(5,\\) does not fit 'bn1.bias' \\(4,\\)"):
        padim.timm_lite0_state(timm_state, {**lite, "_bn0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="has 1 tensors"):
        padim.timm_lite0_state(timm_state, {"_conv_stem.weight": torch.ones(4, 3)})


def test_padim_sees_msflow_features_unpooled(benchmark_module, torch_single_thread):
    pytest.importorskip("anomalib")
    padim = benchmark_module("padim_baseline")
    model = padim.build_padim(n_features=100, seed=0).double()
    ours = FeatureExtractor("efficientnet_lite0", pool="none").double()
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        theirs = model.feature_extractor((images - 0.5) / 0.5)  # the Lite weights' [-1, 1] input
    for name, mine in zip(padim.LAYERS, ours.raw_features(images), strict=True):
        torch.testing.assert_close(theirs[name], mine, rtol=0, atol=1e-9)


def test_a_whole_run_writes_every_metric(benchmark_module, torch_single_thread, tmp_path):
    pytest.importorskip("anomalib")
    padim = benchmark_module("padim_baseline")
    data = make_fake_category(tmp_path / "cat", n_train=6, n_good=3, n_bad=3, size=48)
    out = tmp_path / "padim.json"
    scores = tmp_path / "scores.csv"
    padim.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--size",
            "64",
            "--n-features",
            "20",
            "--scores",
            str(scores),
        ]
    )
    report = json.loads(out.read_text())
    assert report["fit_images"] == 5 and report["held_out_images"] == 1  # msflow's 10 % hold-out
    metrics = report["metrics"]
    assert metrics["test_images"] == 6 and metrics["eval_resolution"] == "original"
    # the pasted white squares are far from the training texture: PaDiM finds them
    assert metrics["image_auroc"] == 100.0 and metrics["pixel_auroc"] > 90
    assert 0 <= metrics["model_resolution"]["aupro"] <= 100
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"0", "1"}
    bad = min(float(r["score"]) for r in rows if r["label"] == "1")
    assert all(float(r["score"]) < bad for r in rows if r["label"] == "0")  # the AUROC of 100 above
