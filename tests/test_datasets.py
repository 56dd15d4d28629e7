"""Tests for msflow.datasets: folder parsing, error messages, validation, ELPV split, torch dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msflow.config import ConfigError, DataConfig
from msflow.data import datasets
from msflow.data.datasets import (
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    ImageDataset,
    Sample,
    elpv_samples,
    find_categories,
    folder_samples,
    load_data,
    load_dataset,
    parse_folder,
    validate_samples,
)
from msflow.errors import DataError


def _img(path: Path, size: tuple[int, int] = (12, 10), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[2:4, 3:6] = 255
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(root: Path, mask_suffix: str = "_mask", with_gt: bool = True) -> Path:
    """A tiny MVTec-style category: 3 train, 2 good test, 2 'crack' + 1 'hole' defects."""
    for i in range(3):
        _img(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _img(root / "test" / "good" / f"{i:03d}.png")
    for kind, n in (("crack", 2), ("hole", 1)):
        for i in range(n):
            _img(root / "test" / kind / f"{i:03d}.png", value=30)
            if with_gt:
                _mask(root / "ground_truth" / kind / f"{i:03d}{mask_suffix}.png")
    (root / "train" / "good" / "readme.txt").write_text("ignored")
    (root / "test" / "good" / ".DS_Store").write_bytes(b"\0")
    return root


def test_category_lists() -> None:
    assert len(MVTEC_CATEGORIES) == 15 and "metal_nut" in MVTEC_CATEGORIES
    assert len(VISA_CATEGORIES) == 12 and "pipe_fryum" in VISA_CATEGORIES


@pytest.mark.parametrize("suffix", ["_mask", ""])
def test_parse_mvtec_layout(tmp_path: Path, suffix: str) -> None:
    root = make_mvtec(tmp_path / "bottle", mask_suffix=suffix)
    train, test = parse_folder(root)
    assert [s.image.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask is None for s in train)
    assert [s.defect_type for s in test] == ["good", "good", "crack", "crack", "hole"]
    assert [s.label for s in test] == [0, 0, 1, 1, 1]
    assert test[0].mask is None
    assert test[3].mask == root / "ground_truth" / "crack" / f"001{suffix}.png"
    assert isinstance(test[0], Sample)


def test_parse_visa_layout(tmp_path: Path) -> None:
    root = tmp_path / "pcb1"
    _img(root / "train" / "good" / "0000.JPG", size=(16, 9))
    _img(root / "test" / "good" / "0001.JPG", size=(16, 9))
    _img(root / "test" / "bad" / "0002.JPG", size=(16, 9))
    _mask(root / "ground_truth" / "bad" / "0002.png", size=(16, 9))
    train, test = parse_folder(root)
    assert len(train) == 1
    mask = root / "ground_truth" / "bad" / "0002.png"
    assert test[1] == Sample(root / "test" / "bad" / "0002.JPG", 1, "bad", mask)
    validate_samples(train + test, "VisA set")


def test_no_ground_truth_means_no_masks(tmp_path: Path) -> None:
    train, test = parse_folder(make_mvtec(tmp_path / "c", with_gt=False))
    assert len(test) == 5 and all(s.mask is None for s in test)
    assert sum(s.label for s in test) == 3


def _message(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    return str(excinfo.value)


def test_error_missing_category(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        parse_folder(tmp_path / "absent")
    assert str(tmp_path / "absent") in _message(info)


def test_error_train_good_missing_or_empty(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="missing") as info:
        parse_folder(root)
    assert str(root / "train" / "good") in _message(info)
    (root / "train" / "good").mkdir(parents=True)
    (root / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as info:
        parse_folder(root)
    assert str(root / "train" / "good") in _message(info)


def test_test_folder_is_optional_but_not_empty(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    _img(root / "train" / "good" / "a.png")
    train, test = parse_folder(root)  # good images only: a model can still be trained
    assert len(train) == 1 and test == []
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images") as info:
        parse_folder(root)
    assert str(root / "test") in _message(info)


def test_error_mask_without_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    orphan = _mask(root / "ground_truth" / "crack" / "099_mask.png")
    with pytest.raises(DataError, match="no matching image") as info:
        parse_folder(root)
    assert str(orphan) in _message(info)


def test_error_masks_for_unknown_defect_type(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    orphan = _mask(root / "ground_truth" / "scratch" / "000_mask.png")
    with pytest.raises(DataError, match="no matching image") as info:
        parse_folder(root)
    assert str(orphan) in _message(info)


def test_error_image_without_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    lonely = _img(root / "test" / "crack" / "005.png")
    with pytest.raises(DataError, match="has no mask") as info:
        parse_folder(root)
    assert str(lonely) in _message(info)


def test_error_defect_type_without_masks_when_ground_truth_exists(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    _img(root / "test" / "stain" / "000.png")
    with pytest.raises(DataError) as info:
        parse_folder(root)
    assert str(root / "ground_truth" / "stain") in _message(info)


def test_error_two_masks_for_one_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    dup = _mask(root / "ground_truth" / "hole" / "000.png")
    with pytest.raises(DataError, match="two masks") as info:
        parse_folder(root)
    assert str(dup) in _message(info)


def test_spaces_and_non_ascii_names(tmp_path: Path) -> None:
    root = tmp_path / "my data" / "Prüfteil ü"
    _img(root / "train" / "good" / "bild 1.png")
    _img(root / "test" / "good" / "bild 2.png")
    _img(root / "test" / "Kratzer groß" / "teil ä.png")
    _mask(root / "ground_truth" / "Kratzer groß" / "teil ä_mask.png")
    name, train, test = load_dataset(str(root))
    assert name == "Prüfteil ü"
    assert test[1].mask is not None and test[1].defect_type == "Kratzer groß"
    validate_samples(train + test)


def test_find_categories(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "b")
    make_mvtec(tmp_path / "a")
    (tmp_path / "not_a_category").mkdir()
    assert find_categories(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert find_categories(tmp_path / "a") == [tmp_path / "a"]
    with pytest.raises(DataError) as info:
        find_categories(tmp_path / "not_a_category")
    assert str(tmp_path / "not_a_category") in _message(info)
    with pytest.raises(DataError, match="several categories"):
        load_dataset(str(tmp_path))


def test_plain_folder_is_good_images_only(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    _img(root / "a.png")
    _img(root / "line 2" / "b.png")  # nested, no train/
    _img(root / "line 2" / "deeper" / "c.jpg")
    name, train, test = load_dataset(str(root))
    assert name == "parts" and test == []
    assert sorted(s.image.name for s in train) == ["a.png", "b.png", "c.jpg"]
    assert all(s.label == 0 and s.mask is None for s in train)


def test_plain_folder_with_test_but_no_train_is_refused(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    shutil.rmtree(root / "train")  # an MVTec category missing train/: its defects must not be trained on
    with pytest.raises(DataError, match="no train/good/") as info:
        load_dataset(str(root))
    assert str(root) in _message(info)


@pytest.mark.parametrize("suffix", ["", "_mask", "-mask", "_gt"])
def test_folder_layout_matches_masks_by_stem(tmp_path: Path, suffix: str) -> None:
    normal, abnormal, masks = tmp_path / "ok", tmp_path / "nok", tmp_path / "masks"
    for i in range(10):
        _img(normal / f"{i:02d}.png")
    _img(abnormal / "crack" / "x1.png", value=30)
    _img(abnormal / "hole" / "x1.png", value=30)  # the same stem in two defect types
    _mask(masks / "crack" / f"x1{suffix}.png")
    _mask(masks / "hole" / f"x1{suffix}.png")
    train, test = folder_samples(str(normal), str(abnormal), str(masks), test_fraction=0.2)
    assert len(train) == 8 and [s.label for s in test] == [0, 0, 1, 1]
    assert not {s.image for s in train} & {s.image for s in test}  # held-out good images never train
    assert [(s.defect_type, s.mask) for s in test[2:]] == [
        ("crack", masks / "crack" / f"x1{suffix}.png"),
        ("hole", masks / "hole" / f"x1{suffix}.png"),
    ]
    validate_samples(train + test)
    name, train2, test2 = load_data(DataConfig(normal_dir=str(normal), abnormal_dir=str(abnormal)))
    assert name == "ok" and train2 == train and all(s.mask is None for s in test2)  # the same split


def test_folder_layout_names_the_first_image_without_a_mask(tmp_path: Path) -> None:
    normal, abnormal, masks = tmp_path / "ok", tmp_path / "nok", tmp_path / "masks"
    for i in range(4):
        _img(normal / f"{i}.png")
    _img(abnormal / "a.png")
    _img(abnormal / "b.png")
    _mask(masks / "a_mask.png")
    with pytest.raises(DataError) as info:
        folder_samples(str(normal), str(abnormal), str(masks), 0.2)
    assert len(_message(info).splitlines()) == 1
    assert f"'{abnormal / 'b.png'}' has no mask in '{masks}'" in _message(info)


def test_folder_layout_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="needs normal_dir"):
        DataConfig(abnormal_dir="x")
    with pytest.raises(ConfigError, match="needs abnormal_dir"):
        DataConfig(normal_dir="x", mask_dir="y")


def test_validate_samples_reports_all_problems(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    train, test = parse_folder(root)
    validate_samples(train + test)  # all fine

    (root / "train" / "good" / "001.png").write_text("not an image")
    (root / "train" / "good" / "002.png").write_bytes(b"")
    _mask(root / "ground_truth" / "hole" / "000_mask.png", size=(20, 20))  # image is 12x10
    with pytest.raises(DataError) as info:
        validate_samples(train + test, what="training set")
    lines = _message(info).splitlines()
    assert lines[0] == "training set: 3 of 8 samples cannot be used"
    assert len(lines) == 4
    assert str(root / "train" / "good" / "001.png") in lines[1]
    assert "empty file" in lines[2]
    assert "20x20 but its image is 12x10" in lines[3]
    with pytest.raises(DataError, match="and 1 more"):
        validate_samples(train + test, max_listed=2)
    with pytest.raises(DataError, match="is empty"):
        validate_samples([], what="test set")


def test_image_dataset_items(tmp_path: Path) -> None:
    _, test = parse_folder(make_mvtec(tmp_path / "cat"))
    ds = ImageDataset(test, image_size=8)
    assert len(ds) == 5
    # Masks are never decoded for the model input (metrics read them at full resolution).
    test[2].mask.write_bytes(b"not a png")
    good, bad = ds[0], ds[2]
    assert good["image"].shape == (3, 8, 8) and good["image"].dtype == torch.float32
    assert "mask" not in good and good["label"] == 0
    assert bad["label"] == 1 and bad["index"] == 2
    assert bad["original_size"].tolist() == [12, 10]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["original_size"].shape == (5, 2)
    assert batch["label"].tolist() == [0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- ELPV (real package)

ELPV_COUNTS = {"mono": (411, 177, 313), "poly": (644, 276, 402)}  # train good, test good, test defect


@pytest.mark.parametrize("category", ["mono", "poly"])
def test_elpv_split(category: str) -> None:
    pytest.importorskip("elpv_dataset")
    train, test = elpv_samples(category, seed=0)
    test_good = [s for s in test if s.label == 0]
    test_bad = [s for s in test if s.label == 1]
    assert (len(train), len(test_good), len(test_bad)) == ELPV_COUNTS[category]
    n_good = len(train) + len(test_good)
    assert len(train) == n_good * 7 // 10  # the documented 70/30 rule (rounded down)
    assert {s.image for s in train}.isdisjoint(s.image for s in test)
    assert all(s.mask is None for s in train + test)
    assert {s.defect_type for s in test_bad} == {"defect"}
    again, _ = elpv_samples(category, seed=0)
    assert again == train  # deterministic
    other, _ = elpv_samples(category, seed=1)
    assert {s.image for s in other} != {s.image for s in train}
    validate_samples(train[:3] + test_bad[:3], what="elpv subset")


def test_elpv_specs() -> None:
    pytest.importorskip("elpv_dataset")
    name, train, test = load_dataset("elpv:poly")
    assert name == "elpv-poly" and len(train) == 644
    with pytest.raises(DataError, match="elpv:mono"):
        load_dataset("elpv:both")
    with pytest.raises(DataError, match="mono"):
        elpv_samples("cigs")  # type: ignore[arg-type]


def test_elpv_materialised_when_not_plain_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the package data are not plain files (e.g. zipped), PNGs are copied to the cache atomically."""

    class Resource:  # minimal Traversable stand-in
        def __init__(self, name: str) -> None:
            self.name = name

        def __truediv__(self, other: str) -> Resource:
            return Resource(f"{self.name}/{other}")

        def read_bytes(self) -> bytes:
            Image.new("L", (4, 4), 0).save(tmp_path / "src.png")
            return (tmp_path / "src.png").read_bytes()

    rows = [
        ("images/cell0001.png", 0.0, "mono"),
        ("images/cell0002.png", 1.0, "mono"),
        ("images/cell0003.png", 0.0, "poly"),
    ]
    monkeypatch.setattr(datasets, "_elpv_rows", lambda: (rows, Resource("data")))
    monkeypatch.setenv("MSFLOW_CACHE", str(tmp_path / "cache"))
    train, test = elpv_samples("mono")
    cache = tmp_path / "cache" / "elpv" / "mono"
    assert train == [] and [s.image for s in test] == [cache / "cell0001.png", cache / "cell0002.png"]
    assert all(s.image.is_file() for s in test)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    mtime = test[0].image.stat().st_mtime_ns
    elpv_samples("mono")  # reused, not rewritten
    assert test[0].image.stat().st_mtime_ns == mtime
