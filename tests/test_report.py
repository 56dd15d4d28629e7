"""Tests for msflow.report: overlays, CSV, plots and metric tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from msflow.errors import MSFlowError
from msflow.evaluate.report import (
    PREDICTION_FIELDS,
    RowWriter,
    format_metrics,
    jet_overlay,
    metrics_table,
    plot_loss_curve,
    plot_score_histogram,
    read_rows,
    save_overlay,
    with_mean_row,
    write_table,
)

JET = matplotlib.colormaps["jet"]


def _blend(pixel: np.ndarray, value: float, alpha: float) -> np.ndarray:
    colour = np.array(JET(value)[:3]) * 255.0
    return np.rint((1 - alpha) * pixel.astype(float) + alpha * colour).astype(np.uint8)


def _png_ok(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        if size is not None:
            assert im.size == size


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- overlays
def test_overlay_shape_dtype(image: np.ndarray) -> None:
    out = jet_overlay(image, np.random.default_rng(1).random((20, 24)))
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8


def test_constant_map_blends_jet_zero(image: np.ndarray) -> None:
    out = jet_overlay(image, np.zeros((20, 24)), alpha=0.45)
    for y, x in [(0, 0), (7, 13), (19, 23)]:
        np.testing.assert_array_equal(out[y, x], _blend(image[y, x], 0.0, 0.45))


def test_min_max_normalisation_and_alpha_extremes(image: np.ndarray) -> None:
    amap = np.zeros((20, 24))
    amap[5, 5] = 3.0
    amap[6, 6] = 1.5
    out = jet_overlay(image, amap, alpha=0.3)
    np.testing.assert_array_equal(out[5, 5], _blend(image[5, 5], 1.0, 0.3))
    np.testing.assert_array_equal(out[6, 6], _blend(image[6, 6], 0.5, 0.3))
    np.testing.assert_array_equal(jet_overlay(image, amap, alpha=0.0), image)
    full = jet_overlay(image, amap, alpha=1.0)
    np.testing.assert_array_equal(full[5, 5], np.rint(np.array(JET(1.0)[:3]) * 255))


def test_explicit_vmin_vmax_clips(image: np.ndarray) -> None:
    amap = np.array([[-5.0, 0.5, 10.0] * 8] * 20)
    out = jet_overlay(image, amap, alpha=0.5, vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(out[0, 0], _blend(image[0, 0], 0.0, 0.5))
    np.testing.assert_array_equal(out[0, 1], _blend(image[0, 1], 0.5, 0.5))
    np.testing.assert_array_equal(out[0, 2], _blend(image[0, 2], 1.0, 0.5))


def test_gt_and_pred_contours(image: np.ndarray) -> None:
    gt = np.zeros((20, 24), bool)
    gt[5:10, 5:12] = True
    pred = np.zeros((20, 24), bool)
    pred[12:18, 15:22] = True
    out = jet_overlay(image, np.zeros((20, 24)), gt_mask=gt, pred_mask=pred)
    plain = jet_overlay(image, np.zeros((20, 24)))
    # every pixel on the GT rectangle's edge is green, the interior is untouched
    for y, x in [(5, 5), (5, 8), (9, 11), (7, 5), (7, 11)]:
        assert tuple(out[y, x]) == (0, 255, 0)
    np.testing.assert_array_equal(out[6:9, 6:11], plain[6:9, 6:11])
    for y, x in [(12, 15), (17, 21), (14, 15)]:
        assert tuple(out[y, x]) == (255, 0, 0)
    np.testing.assert_array_equal(out[13:17, 16:21], plain[13:17, 16:21])
    # outside both masks nothing changes
    np.testing.assert_array_equal(out[0:4], plain[0:4])


def test_contour_closed_at_image_border(image: np.ndarray) -> None:
    gt = np.zeros((20, 24), bool)
    gt[0:4, 0:4] = True
    out = jet_overlay(image, np.zeros((20, 24)), gt_mask=gt)
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[0, 2]) == (0, 255, 0)


def test_overlay_rejects_bad_input(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        jet_overlay(image, np.zeros((5, 5)))
    with pytest.raises(ValueError):
        jet_overlay(image, np.zeros((20, 24)), alpha=1.5)
    with pytest.raises(ValueError):
        jet_overlay(image, np.zeros((20, 24)), gt_mask=np.zeros((3, 3), bool))


def test_save_overlay(tmp_path: Path, image: np.ndarray) -> None:
    path = save_overlay(tmp_path / "a" / "b" / "o.png", image, np.zeros((20, 24)), alpha=0.2)
    _png_ok(path, size=(24, 20))
    expected = jet_overlay(image, np.zeros((20, 24)), alpha=0.2)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


# ----------------------------------------------------------------------------- CSV / plots
def test_predictions_csv_round_trip(tmp_path: Path) -> None:
    rows = [
        {"image": "good/000.png", "score": 0.125, "label": 0},
        {"image": "crack/ä 001.png", "score": 3.5, "label": 1, "defect_type": "x,y", "unknown": 1},
    ]
    path = tmp_path / "sub" / "pred.csv"
    writer = RowWriter(path, PREDICTION_FIELDS)
    writer.write(rows[0])
    writer.close()
    with path.open("a", encoding="utf-8") as fh:
        fh.write("cut,short")  # a crash in the middle of a row: dropped when the file is continued
    writer = RowWriter(path, PREDICTION_FIELDS, append=True)
    writer.write(rows[1])
    writer.close()
    back = list(read_rows(path))
    assert list(back[0]) == PREDICTION_FIELDS
    assert back[0]["image"] == "good/000.png" and back[0]["score"] == "0.125" and back[0]["overlay"] == ""
    assert back[1]["image"] == "crack/ä 001.png" and back[1]["defect_type"] == "x,y"
    assert len(back) == 2
    with pytest.raises(MSFlowError, match="cannot continue"):
        RowWriter(path, ["image", "score"], append=True)


def test_score_histogram(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 40), rng.normal(4, 1, 20)])
    labels = [0] * 40 + [1] * 20
    _png_ok(plot_score_histogram(tmp_path / "h" / "hist.png", scores, labels, threshold=2.0))
    _png_ok(plot_score_histogram(tmp_path / "one.png", [1.0, 1.0, 1.0], [0, 0, 0]))
    _png_ok(plot_score_histogram(tmp_path / "empty.png", [], []))
    with pytest.raises(ValueError):
        plot_score_histogram(tmp_path / "bad.png", [1.0, 2.0], [0])


def test_loss_curve(tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": -1.2e5 + 3e4 * (e % 3) - 1e3 * e} for e in range(1, 8)]
    history.append({"epoch": 8, "loss": float("nan")})
    _png_ok(plot_loss_curve(tmp_path / "l" / "loss.png", history))
    _png_ok(plot_loss_curve(tmp_path / "mixed.png", [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": -3.0}]))
    assert plot_loss_curve(tmp_path / "none.png", []) is None
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------- tables
ROWS = [
    {"category": "bottle", "image_auroc": 100.0, "pixel_auroc": 98.456, "n": 3},
    {"category": "cable", "image_auroc": 99.0, "pixel_auroc": None, "n": 5},
]
COLUMNS = ["category", "image_auroc", "pixel_auroc", "n"]


def test_metrics_table_exact() -> None:
    assert metrics_table(ROWS, COLUMNS) == (
        "| category | image_auroc | pixel_auroc | n |\n"
        "|---|---|---|---|\n"
        "| bottle | 100.00 | 98.46 | 3 |\n"
        "| cable | 99.00 | – | 5 |"
    )


def test_with_mean_row() -> None:
    inputs = ROWS + [{"category": "x", "image_auroc": float("nan")}]
    rows = with_mean_row(inputs, COLUMNS)
    assert len(rows) == 4 and rows[:2] == ROWS and len(inputs) == 3  # input list untouched
    mean = rows[-1]
    assert mean["category"] == "mean"
    assert mean["image_auroc"] == pytest.approx(99.5)
    assert mean["pixel_auroc"] == pytest.approx(98.456)
    assert mean["n"] == pytest.approx(4.0)
    empty = with_mean_row([], COLUMNS)
    assert empty == [{"category": "mean", "image_auroc": None, "pixel_auroc": None, "n": None}]


def test_write_table(tmp_path: Path) -> None:
    rows = with_mean_row(ROWS, COLUMNS)
    paths = write_table(tmp_path / "out" / "bench.v1", rows, COLUMNS)
    assert {p.name for p in paths.values()} == {"bench.v1.md", "bench.v1.csv", "bench.v1.json"}
    assert paths["md"].read_text(encoding="utf-8") == metrics_table(rows, COLUMNS) + "\n"
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data[1]["pixel_auroc"] is None and data[2]["category"] == "mean"
    assert data[2]["image_auroc"] == pytest.approx(99.5)
    with paths["csv"].open(encoding="utf-8", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["category"] for r in back] == ["bottle", "cable", "mean"]
    assert back[1]["pixel_auroc"] == "" and float(back[0]["pixel_auroc"]) == 98.456


def test_format_metrics() -> None:
    per_type = {"crack": 99.1, "scratch": 95.0}
    text = format_metrics({"image_auroc": 97.123, "aupro": 91.0, "per_defect_type": per_type, "other": 1})
    lines = text.splitlines()
    assert lines[0].split() == ["image", "AUROC", "97.12"]
    assert lines[1].split() == ["AUPRO", "91.00"]
    assert lines[2].startswith("per defect type")
    assert lines[3].split() == ["crack", "99.10"] and lines[4].split() == ["scratch", "95.00"]
    assert "pixel" not in text
    assert format_metrics({}) == "(no metrics)"


def test_a_row_writer_never_continues_a_file_under_another_header(tmp_path: Path) -> None:
    from msflow.errors import MSFlowError
    from msflow.evaluate.report import RowWriter

    path = tmp_path / "p.csv"
    writer = RowWriter(path, ["image", "score"])
    writer.write({"image": "a.png", "score": 1.0})
    writer.close()
    again = RowWriter(path, ["image", "score"], append=True)  # same columns: continued
    again.write({"image": "b.png", "score": 2.0})
    again.close()
    with pytest.raises(MSFlowError, match="columns"):
        RowWriter(path, ["image", "label", "score"], append=True)
    assert path.read_text().splitlines() == ["image,score", "a.png,1.0", "b.png,2.0"]  # kept as it was
