"""The same picture gets the identical score however it arrives (one decoder, one rule per dtype).

A picture with 8-bit values v is written as an 8-bit PNG, a 16-bit PNG (v * 257), a float TIFF
(v / 255), and passed as PIL images, uint8 / uint16 / int32 / float arrays and HTTP uploads. Every
route must give bit-identical scores and maps: 16-bit data is kept at full precision and float data
is read in [0, 1], so all of them describe exactly the same values.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from msflow.infer.serve import create_app

try:
    from serve_fixtures import detector, run_dir  # noqa: F401
except ImportError:  # tests/ became a package
    from .serve_fixtures import detector, run_dir  # noqa: F401


def _picture(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    """A smooth 8-bit picture with a bright blob (scores depend on every pixel)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    blob = np.exp(-((xx - 20) ** 2 + (yy - 30) ** 2) / 40)
    base = 90 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 200 * blob
    if len(shape) == 3:
        base = base[..., None] * np.array([1.0, 0.8, 0.6])
    return np.clip(base + rng.normal(0, 4, shape), 0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _routes(v: np.ndarray, tmp_path: Path) -> dict[str, object]:
    """Every entry point a picture ``v`` (uint8, grey or RGB) can take, except HTTP uploads."""
    routes: dict[str, object] = {
        "8-bit PNG file": tmp_path / "p8.png",
        "PIL image": Image.fromarray(v),
        "uint8 array": v,
        "uint16 array": v.astype(np.uint16) * 257,
        "float32 array": v.astype(np.float32) / 255,
        "float64 array": v.astype(np.float64) / 255,
        "PNG bytes": _encoded(v, "PNG"),
    }
    (tmp_path / "p8.png").write_bytes(routes["PNG bytes"])
    if v.ndim == 2:  # Pillow holds 16-bit and float files only for one channel
        routes["16-bit PNG file"] = tmp_path / "p16.png"
        (tmp_path / "p16.png").write_bytes(_encoded(v.astype(np.uint16) * 257, "PNG"))
        routes["float TIFF file"] = tmp_path / "pf.tif"
        (tmp_path / "pf.tif").write_bytes(_encoded(v.astype(np.float32) / 255, "TIFF"))
        routes["int32 array"] = v.astype(np.int32) * 257
        routes["RGB array"] = np.repeat(v[..., None], 3, axis=2)
        routes["opaque LA array"] = np.stack([v, np.full_like(v, 255)], axis=2)
    else:
        routes["opaque RGBA PIL image"] = Image.fromarray(v).convert("RGBA")
    return routes


@pytest.mark.parametrize("shape", [(48, 40), (48, 40, 3)], ids=["grey", "rgb"])
def test_every_entry_point_gives_the_identical_score(detector, tmp_path: Path, shape) -> None:  # noqa: F811
    v = _picture(shape)
    routes = _routes(v, tmp_path)
    results = {name: detector.predict(source) for name, source in routes.items()}
    reference = results["8-bit PNG file"]
    for name, res in results.items():
        assert res.score == reference.score, name
        assert np.array_equal(res.anomaly_map, reference.anomaly_map), name
    uploads = {"8-bit PNG": routes["PNG bytes"]}
    if len(shape) == 2:
        uploads["16-bit PNG"] = routes["16-bit PNG file"].read_bytes()
        uploads["float TIFF"] = routes["float TIFF file"].read_bytes()
    with TestClient(create_app(detector)) as client:
        for name, data in uploads.items():
            r = client.post("/predict", files={"file": ("x", data, "application/octet-stream")})
            assert r.status_code == 200, (name, r.text)
            assert r.json()["score"] == reference.score, name
            assert (r.json()["width"], r.json()["height"]) == (40, 48)


def test_different_pictures_get_different_scores(detector) -> None:  # noqa: F811
    # Guards the test above: the model's score really depends on the pixels.
    a, b = _picture((48, 40), seed=3), _picture((48, 40), seed=4)
    assert detector.predict(a).score != detector.predict(b).score
