"""An exported run deployed without msflow: onnxruntime, Pillow and numpy read the .onnx file alone (its
metadata says how to prepare the input and where the threshold is) and decide 50 images exactly as
``msflow predict`` does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msflow.cli import main

try:
    from serve_fixtures import build_run
except ImportError:  # tests/ became a package
    from .serve_fixtures import build_run

N_IMAGES = 50


def _write_images(folder: Path) -> list[Path]:
    """50 smooth random images of several sizes and modes (the file's input size is 64 x 64)."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    paths = []
    for i in range(N_IMAGES):
        w, h = (64, 64) if i % 3 == 0 else (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"img_{i:02d}.png"
        (img.convert("L") if i % 7 == 0 else img).save(path)
        paths.append(path)
    return paths


def _predict(run: Path, images: Path, out: Path) -> dict[str, dict[str, str]]:
    argv = ["predict", "--model", str(run), "--input", str(images), "--output", str(out)]
    assert main([*argv, "--runtime", "torch", "--no-images", "--quiet"]) == 0
    with (out / "predictions.csv").open(newline="") as fh:
        return {Path(r["image"]).name: r for r in csv.DictReader(fh)}


def _set_threshold_between_scores(run: Path, scores: list[float]) -> float:
    """A threshold in the widest gap between the middle scores, so that both verdicts occur and no score
    sits within float32 rounding of it."""
    s = np.sort(scores)
    middle = range(N_IMAGES // 4, 3 * N_IMAGES // 4)
    i = max(middle, key=lambda k: s[k + 1] - s[k])
    threshold = float((s[i] + s[i + 1]) / 2)
    meta_path = run / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = {
        **meta["threshold"],
        "image": threshold,
        "score_min": float(s[0]),
        "score_max": float(s[-1]),
    }
    meta_path.write_text(json.dumps(meta))
    return threshold


def decide_with_onnxruntime_only(onnx_file: Path, image_files: list[Path]) -> dict[str, tuple[str, float]]:
    """What a user does without msflow: every number comes from the file's metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    h, w = int(meta["image_height"]), int(meta["image_width"])
    threshold = float(meta["threshold_image"])
    out = {}
    for path in image_files:  # the recipe in meta["preprocess"]
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        channels = [
            np.asarray(Image.fromarray(rgb[:, :, c], mode="F").resize((w, h), Image.Resampling.LANCZOS))
            for c in range(3)
        ]
        batch = np.clip(np.stack(channels), 0.0, 1.0)[None].astype(np.float32)
        scores, normalized = session.run(["scores", "normalized_score"], {"images": batch})
        out[path.name] = ("defective" if scores[0] >= threshold else "good", float(normalized[0]))
    return out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("deploy")
    run = build_run(root)
    images = _write_images(root / "images")
    first = _predict(run, root / "images", root / "before")
    _set_threshold_between_scores(run, [float(r["score"]) for r in first.values()])
    assert main(["export", "--model", str(run), "--output", str(root / "deployed.onnx")]) == 0
    return run, root / "deployed.onnx", images


def test_onnxruntime_alone_decides_as_msflow_predict(deployed, tmp_path: Path) -> None:
    run, onnx_file, images = deployed
    theirs = decide_with_onnxruntime_only(onnx_file, images)
    ours = _predict(run, images[0].parent, tmp_path / "after")
    assert len(ours) == len(theirs) == N_IMAGES
    verdicts = {name: r["decision"] for name, r in ours.items()}
    assert verdicts == {name: v for name, (v, _) in theirs.items()}
    assert set(verdicts.values()) == {"good", "defective"}  # both verdicts occur: the test can fail
    for name, (_, normalized) in theirs.items():  # the graph's normalised score is msflow's
        assert normalized == pytest.approx(float(ours[name]["normalized_score"]), abs=1e-5)
        assert (normalized >= 0.5) == (verdicts[name] == "defective")


def test_the_file_carries_the_decision_and_no_paths(deployed) -> None:
    import onnxruntime as ort

    run, onnx_file, _ = deployed
    meta = ort.InferenceSession(str(onnx_file)).get_modelmeta().custom_metadata_map
    saved = json.loads((run / "model.json").read_text())["threshold"]
    assert (
        float(meta["threshold_image"]) == saved["image"] and float(meta["threshold_pixel"]) == saved["pixel"]
    )
    assert float(meta["score_min"]) == saved["score_min"] and float(meta["score_max"]) == saved["score_max"]
    assert "0.5" in meta["normalized_score"] and "threshold_image" in meta["decision"]
    assert "Lanczos" in meta["preprocess"] and meta["outputs"].split(",")[-1] == "normalized_score"
    config = json.loads(meta["config"])
    assert config["backbone"] == "resnet18" and config["image_size"] == 64
    assert str(run.parent) not in "".join(meta.values())  # no filesystem path of the run
    assert meta["normalization"] and meta["score"]


def test_msflow_reads_its_own_four_output_file(deployed) -> None:
    from msflow.infer.export import OnnxModel

    _, onnx_file, _ = deployed
    model = OnnxModel(onnx_file)
    scores, pixel_map, image_map = model.predict(np.full((2, 3, 64, 64), 0.5, np.float32))
    assert scores.shape == (2,) and pixel_map.shape == image_map.shape == (2, 64, 64)
