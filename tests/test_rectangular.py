"""Non-square inputs (issue 13): config, flows, maps, data, export, train -> predict -> serve at H != W.

Square sizes must keep their exact behaviour (int in the config, identical state dicts); every layer
that depends on the grid is checked at a size whose height and width differ.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from msflow import ModelConfig, MSFlow
from msflow.config import Config, parse_image_size
from msflow.data.datasets import ImageDataset, Sample
from msflow.data.sizing import size_for_aspect
from msflow.errors import ConfigError
from msflow.model.anomaly_map import AnomalyMapper
from msflow.model.fusion_flow import FusionFlow
from msflow.model.parallel_flow import ParallelFlow, positional_encoding_2d
from msflow.scoring import MapSettings
from msflow.train.synthetic_check import MIN_EFFECT

try:
    from flow_helpers import (
        assert_log_det_matches,
        brute_force_log_det,
        brute_force_log_det_multi,
        perturb_all_,
        perturb_coupling_,
    )
except ImportError:  # tests/ became a package
    from .flow_helpers import (
        assert_log_det_matches,
        brute_force_log_det,
        brute_force_log_det_multi,
        perturb_all_,
        perturb_coupling_,
    )

H, W = 64, 96


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (256, 256),
        ("256", 256),
        ("208x512", (208, 512)),
        ([208, 512], (208, 512)),
        ((64, 64), 64),  # square stays an int: square configs and checkpoints are unchanged
        ("64x64", 64),
        ("auto", "auto:256"),
        ("AUTO:320", "auto:320"),
    ],
)
def test_image_size_forms(value: object, expected: object) -> None:
    assert parse_image_size(value) == expected


@pytest.mark.parametrize("value", ["100", "200x512", "0x64", "64x64x64", "wide", "auto:x", [64], 3.5, True])
def test_bad_image_sizes_are_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        parse_image_size(value)


def test_config_round_trip_keeps_height_and_width(tmp_path: Path) -> None:
    cfg = Config().updated(model={"image_size": "208x512"})
    assert cfg.model.size == (208, 512) and cfg.to_dict()["model"]["image_size"] == [208, 512]
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config().updated(model={"image_size": 256}).to_dict()["model"]["image_size"] == 256
    with pytest.raises(ConfigError, match="resolved"):
        _ = Config().updated(model={"image_size": "auto"}).model.size


def test_auto_size_keeps_the_aspect_ratio_within_the_budget() -> None:
    assert size_for_aspect(1.0, 256) == 256
    h, w = size_for_aspect(1130 / 460, 256)  # the elongated part
    assert h % 32 == 0 and w % 32 == 0 and w > h
    assert abs(w / h - 1130 / 460) < 0.25
    assert abs(h * w - 256**2) <= 0.1 * 256**2
    assert size_for_aspect(0.5, 256) == (352, 192)  # portrait: 362 x 181 snapped to 32


# -- flows ---------------------------------------------------------------------------------------
def test_positional_encoding_on_a_rectangle() -> None:
    enc = positional_encoding_2d(8, 3, 5)  # half = 4 channels per axis, frequencies 1 and 1/100
    assert enc.shape == (8, 3, 5)
    y, x = 2, 4
    want = [math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    want += [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]
    torch.testing.assert_close(enc[:, y, x].double(), torch.tensor(want, dtype=torch.float64))
    assert torch.equal(enc[:4, 0], enc[:4, 2]) and torch.equal(enc[4:, :, 0], enc[4:, :, 4])


@pytest.mark.usefixtures("float64")
def test_parallel_flow_log_det_on_a_rectangle() -> None:
    flow = ParallelFlow(4, 2, 2, 5, cond_channels=4, generator=torch.Generator().manual_seed(1))
    for block in flow.blocks:
        perturb_coupling_(block)
    x = torch.randn(4, 2, 5)
    z, log_det = flow(x[None])
    reference = brute_force_log_det(lambda v: flow(v)[0], x)
    assert abs(float(reference)) > 0.1
    assert_log_det_matches(log_det[0], reference)
    x_rec, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(x_rec[0], x, rtol=0, atol=1e-11)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(1), rtol=0, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_fusion_flow_on_rectangular_grids() -> None:
    channels, grids = [4, 12, 8], [(8, 12), (4, 6), (2, 3)]  # H/8, H/16, H/32 of a 64 x 96 input
    fusion = FusionFlow(channels, generator=torch.Generator().manual_seed(2))
    perturb_all_(fusion)
    xs = [torch.randn(c, h, w) for c, (h, w) in zip(channels, grids, strict=True)]
    zs, log_det = fusion([x[None] for x in xs])
    assert [tuple(z.shape[-2:]) for z in zs] == grids
    reference = brute_force_log_det_multi(lambda parts: fusion(parts)[0], xs)
    assert abs(float(reference)) > 0.1
    assert_log_det_matches(log_det[0], reference)
    xs_rec, log_det_inv = fusion.inverse(zs)
    for x, x_rec in zip(xs, xs_rec, strict=True):
        torch.testing.assert_close(x_rec[0], x, rtol=0, atol=1e-11)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(1), rtol=0, atol=1e-11)


def _model(size: object, seed: int = 0, **overrides: object) -> MSFlow:
    torch.manual_seed(seed)
    return MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=size, **overrides))


def test_model_shapes_and_maps_at_64x96() -> None:
    model = _model(f"{H}x{W}").eval()
    assert model.feature_shapes == [(64, 8, 12), (128, 4, 6), (256, 2, 3)]
    with torch.no_grad():
        out = model(torch.rand(2, 3, H, W))
        pred = model.predict(torch.rand(2, 3, H, W))
    assert [tuple(z.shape[-2:]) for z in out.zs] == [(8, 12), (4, 6), (2, 3)]
    assert pred.pixel_map.shape == (2, H, W) and pred.image_map.shape == (2, H, W)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.rand(1, 3, W, H))  # transposed input: the positional encodings refuse it


@pytest.mark.usefixtures("float64")
def test_model_flow_stack_is_exactly_invertible_at_64x96() -> None:
    model = _model(f"{H}x{W}").double()
    for flow in model.parallel_flows:
        for block in flow.blocks:
            perturb_coupling_(block, scale=0.1)
    feats = [torch.randn(2, c, h, w) for c, h, w in model.feature_shapes]
    with torch.no_grad():
        zs, log_det = model.flow(feats)
        feats_rec, log_det_inv = model.flow_inverse(zs)
    assert log_det.abs().min() > 1.0
    for f, f_rec in zip(feats, feats_rec, strict=True):
        torch.testing.assert_close(f_rec, f, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2), rtol=0, atol=1e-9)


def test_square_sizes_keep_the_same_state_dict() -> None:
    a, b = _model(64).state_dict(), _model("64x64").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _model("64x64").config.image_size == 64


def test_anomaly_maps_upsample_to_a_rectangle() -> None:
    mapper = AnomalyMapper(2, (H, W))
    logps = [torch.zeros(1, 8, 12), torch.zeros(1, 4, 6)]
    logps[0][0, 2, 9] = -5.0  # one unlikely cell, right of centre
    zs = [torch.sqrt(-2 * m)[:, None] for m in logps]  # -0.5 * z^2 = logp, one channel
    out = mapper(zs)
    assert out.pixel_map.shape == (1, H, W)
    y, x = np.unravel_index(int(out.image_map[0].argmax()), (H, W))
    # align_corners=True maps cell (2, 9) of an 8 x 12 grid to pixel (2 * 63 / 7, 9 * 95 / 11)
    assert (y, x) == (round(2 * 63 / 7), round(9 * 95 / 11))


# -- data ----------------------------------------------------------------------------------------
def test_dataset_resizes_images_to_height_by_width(tmp_path: Path) -> None:
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40] = 255  # left half white
    Image.fromarray(img).save(tmp_path / "a.png")
    item = ImageDataset([Sample(image=tmp_path / "a.png", label=0, defect_type="good")], (32, 96))[0]
    assert item["image"].shape == (3, 32, 96) and item["original_size"].tolist() == [80, 40]
    assert item["image"][:, :, :40].min() > 0.9 and item["image"][:, :, 56:].max() < 0.1


# -- export --------------------------------------------------------------------------------------
def test_adaptive_pooling_as_matrices_equals_torch() -> None:
    from msflow.model.fusion_flow import pool_to

    x = torch.randn(2, 3, 13, 32, dtype=torch.float64)  # 208 x 512 -> stride-16 grid 13 x 32
    torch.testing.assert_close(pool_to(x, (7, 16)), F.adaptive_avg_pool2d(x, (7, 16)), rtol=0, atol=1e-14)


# 48 x 80: sides not multiples of 32; with smoothed maps (a blur whose kernel is wider than 48 / 4)
@pytest.mark.parametrize(("h", "w", "smoothing"), [(H, W, 0.0), (48, 80, 4.0)])
def test_onnx_export_matches_torch_at_a_rectangle(h: int, w: int, smoothing: float, tmp_path: Path) -> None:
    from msflow.infer.export import OnnxModel, export_onnx

    model = _model(f"{h}x{w}", score="logp:0.01", smoothing=smoothing).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    runner = OnnxModel(export_onnx(model, tmp_path / "m.onnx"))
    assert runner.image_shape == (h, w) and runner.image_size == (h, w)
    assert runner.metadata["image_size"] == f"{h}x{w}"
    assert float(runner.metadata["smoothing"]) == smoothing
    coarse = torch.rand(3, 3, 8, 8, generator=g)
    images = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        ref = model.predict(images)
    out = runner.predict(images.numpy())
    for r, o in zip(ref, out, strict=True):
        assert o.shape == tuple(r.shape)
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-4)


# -- train -> predict -> serve -------------------------------------------------------------------
def _wide_category(root: Path) -> Path:
    """Good textures 48 x 96 (aspect 2), and defective ones with a bright square and its mask."""
    rng = np.random.default_rng(0)

    def texture() -> np.ndarray:
        base = rng.normal(128, 20, (12, 24, 3)).clip(0, 255).astype(np.uint8)
        return np.array(Image.fromarray(base).resize((96, 48), Image.Resampling.BILINEAR))

    for split, n in (("train/good", 8), ("test/good", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(texture()).save(root / split / f"{i}.png")
    (root / "test/spot").mkdir(parents=True)
    (root / "ground_truth/spot").mkdir(parents=True)
    for i in range(2):
        img, mask = texture(), np.zeros((48, 96), np.uint8)
        img[10:22, 60:72], mask[10:22, 60:72] = 255, 255
        Image.fromarray(img).save(root / "test/spot" / f"{i}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i}_mask.png")
    return root


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run folder (random resnet18) on 48 x 96 images, size, score and maps all "auto"."""
    from msflow.train.fit import fit

    data = _wide_category(tmp_path_factory.mktemp("wide") / "part")
    run = tmp_path_factory.mktemp("runs") / "wide"
    cfg = Config().updated(
        model={
            "backbone": "resnet18",
            "pretrained": False,
            "image_size": "auto:64",
            "score": "auto",
            "smoothing": "auto",  # opt-in: the whole map choice is what these tests check
        },
        data={"dataset": str(data), "holdout_fraction": 0.25},
        train={"epochs": 1, "batch_size": 4, "device": "cpu"},
    )
    fit(cfg, run, progress=False, log=lambda _: None)
    return run


def test_auto_size_and_auto_score_are_resolved_and_recorded(wide_run: Path) -> None:
    saved = yaml.safe_load((wide_run / "config.yaml").read_text())
    # aspect 2 within 64 x 64 pixels: 45 x 91 -> 32 x 96 (multiples of 32)
    assert saved["model"]["image_size"] == [32, 96]
    evidence = json.loads((wide_run / "score_selection.json").read_text())
    assert saved["model"]["score"] == evidence["chosen"] != "auto"
    assert evidence["good_images"] == 2 and evidence["synthetic_images"] == 4
    # auto keeps the incumbent unless candidates beat it beyond the noise; then the best of those
    lower, auroc = evidence["difference_lower_bound"], evidence["auroc"]
    gain = evidence["gain_over_incumbent"]
    allowed = [c for c in lower if lower[c] > 0 and gain[c] >= MIN_EFFECT] + [evidence["incumbent"]]
    assert auroc[evidence["chosen"]] == max(auroc[c] for c in allowed)
    assert evidence["highest_auroc"] in auroc and auroc[evidence["highest_auroc"]] == max(auroc.values())
    meta = json.loads((wide_run / "model.json").read_text())
    assert meta["config"]["model"]["image_size"] == [32, 96]


def test_auto_maps_are_resolved_and_recorded_and_the_model_uses_them(wide_run: Path) -> None:
    from msflow.model.checkpoint import load_model

    saved = yaml.safe_load((wide_run / "config.yaml").read_text())["model"]
    evidence = json.loads((wide_run / "map_selection.json").read_text())
    assert {"normalization": saved["normalization"], "smoothing": saved["smoothing"]} == evidence["chosen"]
    assert saved["normalization"] in ("per_image", "global") and saved["smoothing"] in (0, 2, 4, 8)
    assert len(evidence["pixel_auroc"]) == 8 and evidence["synthetic_images"] == 4
    lower, auroc = evidence["difference_lower_bound"], evidence["pixel_auroc"]
    gain = evidence["gain_over_incumbent"]
    allowed = [c for c in lower if lower[c] > 0 and gain[c] >= MIN_EFFECT] + [evidence["incumbent"]]
    chosen = f"{saved['normalization']}, smoothing {saved['smoothing']:g}"
    assert auroc[chosen] == max(auroc[c] for c in allowed)
    model, _, _ = load_model(wide_run)
    assert (model.anomaly.normalization, model.anomaly.smoothing) == (
        saved["normalization"],
        saved["smoothing"],
    )


def test_choose_re_makes_the_runs_own_decisions(wide_run: Path, tmp_path: Path) -> None:
    """``msflow test --choose``'s step re-makes the run's synthetic check and both choices: the same
    held-out images, synthetic defects and rule give the run's recorded evidence."""
    from msflow.infer.predictor import Predictor
    from msflow.train.choice import remake_choices

    predictor = Predictor.load(wide_run)
    asked = MapSettings("auto", "auto", "auto", predictor.config.model.top_k)  # as the run was asked
    settings = remake_choices(predictor, tmp_path / "again", log=lambda _: None, asked=asked)
    saved = yaml.safe_load((wide_run / "config.yaml").read_text())["model"]
    assert (settings.normalization, settings.smoothing, settings.score) == (
        saved["normalization"],
        saved["smoothing"],
        saved["score"],
    )
    for name in ("map_selection.json", "score_selection.json"):
        recorded = json.loads((wide_run / name).read_text())
        again = json.loads((tmp_path / "again" / name).read_text())
        assert again["chosen"] == recorded["chosen"] and again["good_images"] == recorded["good_images"]
        key = "pixel_auroc" if name == "map_selection.json" else "auroc"
        assert again[key] == pytest.approx(recorded[key], abs=1e-6)
        assert again["difference_lower_bound"] == recorded["difference_lower_bound"]
    assert predictor.config.model.score == saved["score"]  # the run's predictor is left as it was


def test_test_command_choose_re_makes_the_choices_and_tests_with_them(wide_run: Path, tmp_path: Path) -> None:
    from msflow.cli import main
    from msflow.evaluate.report import read_rows

    out = tmp_path / "chosen"
    args = ["test", "--model", str(wide_run), "--quiet", "--choose", "--output", str(out)]
    assert main(args) == 0
    maps = json.loads((out / "map_selection.json").read_text())
    scores = json.loads((out / "score_selection.json").read_text())
    recorded = json.loads((wide_run / "score_selection.json").read_text())
    assert scores["auroc"] == pytest.approx(recorded["auroc"], abs=1e-6)  # the run's own check, again
    assert "logp:max@4" in scores["auroc"] and scores["chosen"] == recorded["chosen"]
    assert set(scores["gain_over_incumbent"]) == set(scores["difference_lower_bound"])
    # today's defaults: the normalisation is chosen, the blur stays the paper's (0)
    assert set(maps["pixel_auroc"]) == {"per_image, smoothing 0", "global, smoothing 0"}
    assert (out / "metrics.json").is_file()
    # a map-based score re-scores the run; the run's own files are left as they were
    score = "scales:max" if recorded["used"] == "logp:max@4" else "logp:max@4"
    rescored_dir = tmp_path / "rescored"
    assert (
        main(["test", "--model", str(wide_run), "--quiet", "--score", score, "--output", str(rescored_dir)])
        == 0
    )
    rescored = [float(r["score"]) for r in read_rows(rescored_dir / "predictions.csv")]
    own = [float(r["score"]) for r in read_rows(out / "predictions.csv")]
    assert len(rescored) == len(own) and rescored != pytest.approx(own, abs=1e-6)
    assert json.loads((wide_run / "score_selection.json").read_text()) == recorded


def test_a_rescored_run_judges_with_a_threshold_for_its_score(wide_run: Path, tmp_path: Path) -> None:
    """``msflow test --score X``: the threshold is the 0.99 quantile of X on the run's held-out good images
    (the training split), not the run's threshold for another score (whose decisions would mean nothing)."""
    from msflow.cli import main
    from msflow.data.datasets import load_dataset
    from msflow.data.images import read_image
    from msflow.evaluate.report import read_rows
    from msflow.infer.predictor import Predictor
    from msflow.train.fit import split_holdout

    run = Predictor.load(wide_run)
    score = "logp:max" if run.config.model.score != "logp:max" else "mul:0.1"
    out = tmp_path / "rescored"
    assert main(["test", "--model", str(wide_run), "--quiet", "--score", score, "--output", str(out)]) == 0
    used = {float(r["threshold"]) for r in read_rows(out / "predictions.csv")}

    cfg = run.config
    _, train, _ = load_dataset(cfg.data.dataset)
    _, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    rescored = run.with_settings(cfg.model.maps.with_changes(score=score))
    scores = [p.score for p in rescored.predict_images([read_image(s.image) for s in holdout])]
    assert len(holdout) >= 2 and len(used) == 1
    assert used.pop() == pytest.approx(float(np.quantile(scores, 0.99)), rel=1e-5)
    assert run.threshold.image != pytest.approx(float(np.quantile(scores, 0.99)), rel=1e-3)


def test_predict_and_serve_a_rectangular_run(wide_run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from msflow.detector import Detector
    from msflow.infer.serve import create_app

    detector = Detector.load(wide_run)
    image = Image.fromarray(np.full((60, 150, 3), 120, np.uint8))
    pred = detector.predict(image)
    assert pred.anomaly_map.shape == pred.image_map.shape == (60, 150) and np.isfinite(pred.score)
    buf = tmp_path / "x.png"
    image.save(buf)
    client = TestClient(create_app(detector.predictor))
    with buf.open("rb") as fh:
        response = client.post("/predict", files={"file": ("x.png", fh, "image/png")})
    assert response.status_code == 200, response.text
    assert client.get("/model").json()["config"]["model"]["image_size"] == [32, 96]


def test_cli_predict_export_and_summary_at_a_rectangle(wide_run: Path, tmp_path: Path) -> None:
    def msflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "msflow", *args], capture_output=True, text=True)

    cfg = yaml.safe_load((wide_run / "config.yaml").read_text())
    images = Path(cfg["data"]["dataset"]) / "test" / "spot"
    res = msflow("predict", "--model", str(wide_run), "--input", str(images), "--output", str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr
    res = msflow("export", "--model", str(wide_run))
    assert res.returncode == 0, res.stderr
    res = msflow(
        "predict",
        "--model",
        str(wide_run),
        "--input",
        str(images),
        "--output",
        str(tmp_path / "o"),
        "--runtime",
        "onnx",
    )
    assert res.returncode == 0, res.stderr
    res = msflow("summary", "--backbone", "resnet18", "--image-size", "64x96", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["image_size"] == [64, 96] and info["feature_shapes"][0] == [64, 8, 12]
    res = msflow("summary", "--backbone", "resnet18", "--image-size", "64x100")
    assert res.returncode == 2 and res.stderr.startswith("error:") and "image_size" in res.stderr
