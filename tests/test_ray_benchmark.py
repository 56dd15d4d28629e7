"""``msflow benchmark --executor ray``: categories as Ray tasks on a local instance (num_cpus=2).

The Ray tests skip, with the reason, where Ray is not installed (``pip install "msflow[cluster]"``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_data import make_fake_category

from msflow.cli import main
from msflow.config import Config
from msflow.train.benchmark import COLUMNS, run_benchmark

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='Ray is not installed (pip install "msflow[cluster]")')
CFG = Config().updated(
    model={"backbone": "resnet18", "pretrained": False, "image_size": 64}, train={"epochs": 1}
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray") / "root"
    make_fake_category(root / "alpha", seed=1)
    make_fake_category(root / "beta", seed=2)
    broken = make_fake_category(root / "broken", seed=3)
    for f in (broken / "train" / "good").glob("*.png"):
        f.write_bytes(b"")  # a corrupt category must not stop the others
    return root


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@needs_ray
def test_ray_tasks_reproduce_the_sequential_table_and_rerun_skips_finished_categories(
    root: Path, local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sequential = run_benchmark(root, tmp_path / "local", CFG, progress=False)
    on_ray = run_benchmark(root, tmp_path / "ray", CFG, executor="ray", cpus_per_task=1)
    assert [r["category"] for r in on_ray] == ["alpha", "beta", "broken", "mean"]
    assert "cannot be used" in on_ray[2]["error"] and on_ray[2].get("image_auroc") is None
    same = [c for c in COLUMNS if c != "train_seconds"]
    assert [{c: r.get(c) for c in same} for r in on_ray] == [{c: r.get(c) for c in same} for r in sequential]
    assert on_ray[0]["image_auroc"] is not None and on_ray[1]["pixel_auroc"] is not None
    assert (tmp_path / "ray" / "results.md").read_text().count("\n") >= 5

    finished = {c: (tmp_path / "ray" / c / "model.json").stat().st_mtime_ns for c in ("alpha", "beta")}
    capsys.readouterr()
    again = run_benchmark(root, tmp_path / "ray", CFG, executor="ray", cpus_per_task=1)
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 2
    assert {c: (tmp_path / "ray" / c / "model.json").stat().st_mtime_ns for c in finished} == finished
    assert again[:2] == on_ray[:2]  # the finished rows come back from their metrics.json
    assert "cannot be used" in again[2]["error"]  # the failed category was tried again, and failed again
    saved = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert [r["category"] for r in saved] == ["alpha", "beta", "broken", "mean"]


def test_executor_ray_without_ray_is_a_one_line_error(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    argv = ["benchmark", "--data", str(root), "--output", str(tmp_path / "out"), "--executor", "ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "msflow[cluster]"' in err
    assert not (tmp_path / "out").exists()


def test_ray_flags_need_the_ray_executor(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["benchmark", "--data", str(root), "--output", str(tmp_path), "--address", "x:1"]) == 2
    assert "need --executor ray" in capsys.readouterr().err
