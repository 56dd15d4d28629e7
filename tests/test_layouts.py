"""Each data layout msflow reads trains end to end through ``msflow train`` (1 epoch, a random-weight
ResNet-18 at 64 px): MVTec, VisA (masks named like their images), a plain folder of good images, and
anomalib's normal / abnormal / mask folders, given as flags and as YAML keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from fake_data import make_fake_category

from msflow.cli import main

FLAGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--epochs", "1", "--json"]


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict, str]:
    assert main(["train", *args, *FLAGS]) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()  # --json: one line on stdout, the messages on stderr
    return json.loads(line), err


def _plain_folder(root: Path) -> Path:
    """The fake category's good images as people keep them: some at the top, some in sub-folders."""
    category = make_fake_category(root / "category", n_train=10)
    plain = root / "plain"
    for i, image in enumerate(sorted((category / "train" / "good").iterdir())):
        dest = plain / (f"line {i % 3}" if i % 3 else "") / image.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dest)
    return plain


def test_mvtec_layout_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_fake_category(tmp_path / "mvtec")
    result, _ = _train(capsys, "--data", str(data), "--output", str(tmp_path / "run"))
    assert result["metrics"]["dataset"] == "mvtec"
    assert {"image_auroc", "pixel_auroc", "holdout_images"} <= set(result["metrics"])


def test_visa_layout_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_fake_category(tmp_path / "pcb1")
    for mask in (data / "ground_truth" / "scratch").iterdir():  # VisA names masks like their images
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    result, _ = _train(capsys, "--data", str(data), "--output", str(tmp_path / "run"))
    assert "pixel_auroc" in result["metrics"] and result["metrics"]["holdout_images"] >= 1


def test_plain_folder_trains_and_says_what_it_holds_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result, err = _train(capsys, "--data", str(_plain_folder(tmp_path)), "--output", str(tmp_path / "run"))
    assert result["metrics"]["holdout_images"] == 1 and result["metrics"]["train_images"] == 9
    assert "image_auroc" not in result["metrics"]  # no defective images, no test metrics
    (line,) = [x for x in err.splitlines() if x.startswith("held out")]
    assert "1 of 10 good training images" in line and "no test set" in line
    assert "holdout" in result["decisions"]["threshold"]["method"]


def test_normal_abnormal_mask_folders_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=10)
    folders = [
        "--normal-dir", str(data / "train" / "good"),
        "--abnormal-dir", str(data / "test" / "scratch"),
        "--mask-dir", str(data / "ground_truth" / "scratch"),
    ]  # fmt: skip
    result, _ = _train(capsys, *folders, "--output", str(tmp_path / "run"))
    metrics = result["metrics"]
    assert "pixel_auroc" in metrics and metrics["test_images"] == 2 + 3  # 20 % of 10 good + 3 defective
    assert metrics["train_images"] + metrics["holdout_images"] == 8
    # The same keys in a YAML file; the run's own data section then serves 'msflow test'.
    config = tmp_path / "folders.yaml"
    keys = dict(zip(("normal_dir", "abnormal_dir", "mask_dir"), folders[1::2], strict=True))
    config.write_text(yaml.safe_dump({"data": keys}))
    again, _ = _train(capsys, "--config", str(config), "--output", str(tmp_path / "yaml"))
    assert again["metrics"]["image_auroc"] == metrics["image_auroc"]
    assert main(["test", "--model", str(tmp_path / "yaml"), "--json", "--output", str(tmp_path / "t")]) == 0
    tested = json.loads(capsys.readouterr().out)
    assert tested["metrics"]["image_auroc"] == metrics["image_auroc"]


def test_a_missing_mask_is_one_line_naming_the_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_fake_category(tmp_path / "fake")
    (data / "ground_truth" / "scratch" / "001_mask.png").unlink()
    argv = ["train", "--normal-dir", str(data / "train" / "good"), "--abnormal-dir"]
    argv += [str(data / "test" / "scratch"), "--mask-dir", str(data / "ground_truth" / "scratch")]
    assert main([*argv, "--output", str(tmp_path / "run"), *FLAGS]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and str(data / "test" / "scratch" / "001.png") in line
    assert not (tmp_path / "run" / "model.json").exists()
