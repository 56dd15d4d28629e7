"""benchmarks/real_sets.py: the real-defect converters write the MVTec layout with the right masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def real_sets(benchmark_module):
    return benchmark_module("real_sets")


def _bsdata_source(root, n_good=6, n_bad=2):
    (root / "data").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_good + n_bad):
        stem = f"01_2009{i:08d}_000_crop_2"
        Image.fromarray(rng.integers(0, 255, (46, 113, 3), dtype=np.uint8)).save(
            root / "data" / f"{stem}.jpg"
        )
        if i >= n_good:  # a square of pitting at (20..30, 10..20)
            shape = {
                "label": "Pitting",
                "points": [[20, 10], [30, 10], [30, 20], [20, 20]],
                "shape_type": "polygon",
            }
            (root / "label" / f"{stem}.json").write_text(json.dumps({"shapes": [shape]}))
    # the other view is left out
    Image.fromarray(np.zeros((64, 154, 3), np.uint8)).save(root / "data" / "01_200900000099_000_crop_1.jpg")


def test_bsdata_layout_masks_and_disjoint_good_splits(tmp_path, real_sets):
    _bsdata_source(tmp_path / "src")
    counts = real_sets.convert_bsdata(tmp_path / "src", tmp_path / "out", seed=1, train=4, test_good=2)
    assert counts == {"train/good": 4, "test/good": 2, "test/pitting": 2}
    out = tmp_path / "out"
    train = {p.stem for p in (out / "train" / "good").glob("*.png")}
    test_good = {p.stem for p in (out / "test" / "good").glob("*.png")}
    pitting = sorted((out / "test" / "pitting").glob("*.png"))
    assert len(train) == 4 and len(test_good) == 2 and not train & test_good
    assert not any("crop_1" in s for s in train | test_good)
    for image in pitting:
        mask = np.asarray(Image.open(out / "ground_truth" / "pitting" / f"{image.stem}_mask.png"))
        assert mask.shape == (46, 113) and set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 20, 20, 30)
    with pytest.raises(ValueError, match="defect-free"):
        real_sets.convert_bsdata(tmp_path / "src", tmp_path / "again", train=6, test_good=2)


def test_bsdata_view_all_keeps_the_other_view(tmp_path, real_sets):
    _bsdata_source(tmp_path / "src")
    counts = real_sets.convert_bsdata(tmp_path / "src", tmp_path / "out", train=5, test_good=2, view="all")
    assert counts == {"train/good": 5, "test/good": 2, "test/pitting": 2}
    good = list((tmp_path / "out").glob("*/good/*.png"))
    assert sum("crop_1" in p.stem for p in good) == 1


def test_polygon_mask_refuses_other_shapes(real_sets):
    with pytest.raises(ValueError, match="unsupported"):
        real_sets.polygon_mask([{"points": [[0, 0], [3, 3]], "shape_type": "line"}], (8, 8))


def _crackforest_source(root, n=5, size=(64, 96)):
    from scipy.io import savemat

    (root / "image").mkdir(parents=True)
    (root / "groundTruth").mkdir()
    for i in range(1, n + 1):
        Image.fromarray(np.full((*size, 3), 100 + i, np.uint8)).save(root / "image" / f"{i:03d}.jpg")
        seg = np.ones(size, np.uint8)
        seg[5, :40] = 2  # a crack along row 5 in the left part: the right-hand bottom tiles are clean
        gt = np.empty((1, 1), dtype=[("Segmentation", "O"), ("Boundaries", "O")])
        gt[0, 0] = (seg, (seg == 2).astype(np.uint8))
        savemat(root / "groundTruth" / f"{i:03d}.mat", {"groundTruth": gt})


def test_crackforest_tiles_split_by_image_good_tiles_are_clean(tmp_path, real_sets):
    _crackforest_source(tmp_path / "src")
    out = tmp_path / "out"
    counts = real_sets.convert_crackforest(
        tmp_path / "src", out, seed=0, crop=32, margin=4, min_defect=0.005, train_share=0.6
    )
    assert counts["train/good"] > 0 and counts["test/good"] > 0 and counts["test/crack"] > 0
    assert not (out / "train" / "crack").exists()  # defective tiles never train
    sources = {
        split: {p.stem.split("_")[0] for p in (out / split).rglob("*.png")} for split in ("train", "test")
    }
    assert len(sources["train"]) == 3 and len(sources["test"]) == 2 and not sources["train"] & sources["test"]
    for tile in (out / "train" / "good").glob("*.png"):  # a crack at row 5, x < 40, plus the margin
        y, x = (int(part[1:]) for part in tile.stem.split("_")[1:])
        assert y > 5 + 4 or x > 40 + 4
    for tile in (out / "test" / "crack").glob("*.png"):
        mask = np.asarray(Image.open(out / "ground_truth" / "crack" / f"{tile.stem}_mask.png"))
        assert mask.shape == (32, 32) and (mask == 255).sum() > 0
        assert Image.open(tile).size == (32, 32)


def test_cli_refuses_to_overwrite(tmp_path, real_sets):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        real_sets.main(["bsdata", "--source", str(tmp_path), "--out", str(tmp_path / "out")])


def test_real_maps_difference_interval_sees_a_better_setting(benchmark_module):
    real_maps = benchmark_module("real_maps")
    rng = np.random.default_rng(0)
    bins, bad, good = 16, 30, 20

    def histograms(shift):  # defect pixels `shift` bins above the normal ones
        pos = np.zeros((bad, bins))
        pos[np.arange(bad), rng.integers(4 + shift, 8 + shift, bad)] = 5
        neg = np.zeros((bad, bins))
        neg[np.arange(bad), rng.integers(0, 8, bad)] = 50
        g = np.zeros((good, bins))
        g[np.arange(good), rng.integers(0, 8, good)] = 60
        return pos, neg, g

    paper, same, better = histograms(0), None, histograms(6)
    same = tuple(a.copy() for a in paper)
    out = real_maps.difference_interval({"paper": paper, "same": same, "better": better}, "paper", rounds=200)
    assert out["paper"] == (0.0, 0.0) and out["same"] == (0.0, 0.0)
    assert out["better"][0] > 5.0  # clearly above the paper's maps, beyond the resampling error
