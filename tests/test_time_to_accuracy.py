"""benchmarks/time_to_accuracy.py: the ratio from measured per-image costs and the accuracy check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks" / "time_to_accuracy.py").is_file():
    pytest.skip("no benchmarks/ folder (not a source checkout)", allow_module_level=True)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.time_to_accuracy import main, ratio, report  # noqa: E402
from msflow.config import Config, save_yaml  # noqa: E402

BENCH = {
    "training": {
        # 10 images: extraction 2 s (0.2 s each), our epoch 1 s (0.1 s each), the NLL 0.02 s per image,
        # the reference's epoch 5 s (0.5 s each).
        "ours": {
            "extract_images": 10,
            "extract_seconds": 2.0,
            "epoch_seconds": 1.0,
            "holdout_nll_seconds_per_image": 0.02,
        },
        "reference": {"epoch_seconds": 5.0},
    }
}


def make_run(folder: Path, dataset: str, epochs: int, stop: str, image: float, pixel: float | None) -> Path:
    folder.mkdir(parents=True)
    save_yaml(Config().updated(data={"holdout_fraction": 0.2}), folder / "config.yaml")
    (folder / "model.json").write_text(json.dumps({"training": {"epochs": epochs, "stop": stop}}))
    metrics = {"dataset": dataset, "image_auroc": image, "pixel_auroc": pixel, "aupro": None}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_ratio_by_hand() -> None:
    # 100 x 0.5 / (0.2 x 1.25 + 20 x (0.1 + 0.25 x 0.02)) = 50 / (0.25 + 2.1) = 21.2766
    assert ratio(BENCH["training"], 20, 100, 0.25) == pytest.approx(50 / 2.35)


def test_the_fixed_epoch_cost_is_spread_over_the_real_training_images() -> None:
    # 0.4 s of the bench's 1 s epoch is fixed (the snapshot): with 100 real training images an epoch
    # costs 0.6 / 10 + 0.4 / 100 = 0.064 s per image -> 50 / (0.25 + 20 x (0.064 + 0.005)) = 50 / 1.63
    training = {**BENCH["training"], "ours": {**BENCH["training"]["ours"], "epoch_fixed_seconds": 0.4}}
    assert ratio(training, 20, 100, 0.25, train_images=100) == pytest.approx(50 / 1.63)
    assert ratio(training, 20, 100, 0.25) == pytest.approx(50 / 2.35)  # unknown: the bench's own images


def test_report_checks_the_tolerances(tmp_path: Path) -> None:
    ours = make_run(tmp_path / "ours", "mtd", 20, "plateau", 97.0, 80.0)
    same = make_run(tmp_path / "same", "mtd", 100, "schedule", 97.29, 80.49)  # within 0.3 and 0.5
    better = make_run(tmp_path / "better", "mtd", 100, "schedule", 97.31, 80.0)  # image 0.31 better
    res = report(BENCH, [(str(ours), str(same)), (str(ours), str(better))])
    first, second = res["pairs"]
    assert first["unchanged_accuracy"] and not second["unchanged_accuracy"]
    assert first["deltas"] == {"image_auroc": -0.29, "pixel_auroc": -0.49}
    # holdout_fraction 0.2: 0.25 held-out images per training image
    assert first["time_to_accuracy_speedup"] == pytest.approx(round(50 / 2.35, 2))


def test_different_datasets_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ours = make_run(tmp_path / "ours", "mtd", 20, "plateau", 97.0, None)
    other = make_run(tmp_path / "other", "elpv-mono", 100, "schedule", 97.0, None)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    assert main(["--bench", str(bench), "--pair", str(ours), str(other)]) == 2
    assert "different data" in capsys.readouterr().err
