"""benchmarks/fanout.py: seeded synthetic categories fanned out over Ray workers, with their figures."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason='Ray is not installed (pip install "msflow[cluster]")'
)


def test_categories_are_seeded_with_exact_masks(
    benchmark_module: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    fanout = benchmark_module("fanout")
    one = fanout.write_category(tmp_path / "a", 3, seed=7, images=4, size=64)
    two = fanout.write_category(tmp_path / "b", 3, seed=7, images=4, size=64)
    other = fanout.write_category(tmp_path / "c", 4, seed=7, images=4, size=64)
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 4 + 1 + 1 + 1  # train, test good, test defective, its mask
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert (one / files[-1]).read_bytes() != (other / files[-1]).read_bytes()


def test_efficiency_is_the_speed_up_per_worker(benchmark_module: Callable[[str], ModuleType]) -> None:
    fanout = benchmark_module("fanout")
    task = dict.fromkeys(fanout.TASK_FIGURES, 1.0)
    runs = [
        {"workers": 1, "ray_start_s": 3.0, "wall_s": 100.0, "tasks": [task] * 4},
        {"workers": 2, "ray_start_s": 3.0, "wall_s": 62.5, "tasks": [task] * 4},
    ]
    rows = fanout.summary(runs)
    assert [r["efficiency"] for r in rows] == [1.0, 0.8]  # 100 / (2 x 62.5)
    assert rows[1]["categories"] == 4 and rows[1]["peak_rss_mb_max"] == 1.0


@needs_ray
def test_fanout_trains_every_category_as_a_ray_task_and_reports_its_figures(
    benchmark_module: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    fanout = benchmark_module("fanout")
    argv = ["--out", str(tmp_path), "--categories", "2", "--images", "6", "--epochs", "1", "--workers", "1"]
    (row,) = fanout.main(argv)
    assert row["categories"] == 2 and row["efficiency"] == 1.0 and row["wall_s"] > 0
    assert row["peak_rss_mb_max"] > 100  # a worker with torch and a model holds more than 100 MB
    saved = json.loads((tmp_path / "fanout.json").read_text())
    tasks = saved["runs"][0]["tasks"]
    assert sorted(t["category"] for t in tasks) == ["category_00", "category_01"]
    for t in tasks:
        assert t["extraction_s"] > 0 and t["train_s"] > 0 and t["model_build_s"] >= 0
        assert (tmp_path / "runs_w1" / t["category"] / "metrics.json").is_file()
