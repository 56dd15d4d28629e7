"""The Python API: the README's example runs as printed, and ``Detector.predict`` takes every input kind."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fake_data import make_fake_category
from PIL import Image

from msflow import Detector
from msflow.errors import DataError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(r"```python\n(from msflow import Detector.*?)```", README.read_text(), re.S)
    assert block, "the README lost its Python API example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # the example as a user would paste it
    result = namespace["result"]
    assert 0.0 <= result.normalized_score <= 1.0
    assert result.anomaly_map.shape == result.mask.shape == (300, 300)  # ELPV cells are 300 x 300
    assert isinstance(namespace["detector"], Detector)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Detector, Path]:
    root = tmp_path_factory.mktemp("api")
    data = make_fake_category(root / "fake")
    det = Detector.fit(
        data,
        root / "run",
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64},
        train={"epochs": 1},
    )
    return det, data


def test_predict_accepts_paths_pil_and_numpy(detector: tuple[Detector, Path]) -> None:
    det, data = detector
    path = sorted((data / "test" / "scratch").glob("*.png"))[0]
    pil = Image.open(path)
    arr = np.asarray(pil)
    results = [
        det.predict(path),
        det.predict(str(path)),
        det.predict(pil),
        det.predict(arr),
        det.predict(arr.astype(np.float32) / 255),
        det.predict(arr.astype(np.uint16) * 257),
    ]
    for r in results:
        assert r.score == results[0].score  # one decoder: the same picture, the same score
        assert r.anomaly_map.shape == r.mask.shape == arr.shape[:2]
        assert r.is_defective == (r.score >= r.threshold)
    grey = det.predict(np.asarray(pil.convert("L")))
    assert grey.anomaly_map.shape == arr.shape[:2]


def test_mask_is_empty_for_images_judged_good(detector: tuple[Detector, Path]) -> None:
    det, data = detector
    det.set_threshold(1e9)
    r = det.predict(sorted((data / "test" / "scratch").glob("*.png"))[0])
    assert not r.is_defective and r.mask.sum() == 0 and r.normalized_score < 0.5


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4), np.int64), 12])
def test_bad_inputs_are_refused_with_a_clear_error(detector: tuple[Detector, Path], bad: object) -> None:
    with pytest.raises(DataError):
        detector[0].predict(bad)  # type: ignore[arg-type]
