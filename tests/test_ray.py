"""``--executor ray``: benchmark categories and predict chunks as Ray tasks on a local instance (num_cpus=2).

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
from msflow.infer.predict import run_predict, run_predict_on_ray
from msflow.infer.predictor import Predictor
from msflow.train.benchmark import COLUMNS, run_benchmark
from msflow.train.distributed import KILL_SEAM_ENV, KILL_SEAM_ONCE_ENV
from msflow.train.fit import fit

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
def seam_fired(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Created by the one Ray worker that the fault seam kills (see the worker-death test)."""
    return tmp_path_factory.mktemp("seam") / "fired"


@pytest.fixture(scope="module")
def local_ray(seam_fired: Path) -> Iterator[None]:
    import ray

    # The first task to finish its first epoch of two SIGKILLs its own worker, once per module (the
    # tests that train one epoch never reach the seam).
    seam = {KILL_SEAM_ENV: "0:1:0:KILL", KILL_SEAM_ONCE_ENV: str(seam_fired)}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": seam})
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


@needs_ray
def test_a_category_whose_worker_dies_is_retried_from_its_checkpoint(
    root: Path, local_ray: None, seam_fired: Path, tmp_path: Path
) -> None:
    """A Ray worker killed in the middle of a category (after its first epoch's checkpoint): Ray runs
    the task again (max_retries), the category continues from its checkpoint, the table is complete
    and equals an uninterrupted run's."""
    two_epochs, names = CFG.updated(train={"epochs": 2}), ["alpha", "beta"]
    uninterrupted = run_benchmark(root, tmp_path / "local", two_epochs, names, progress=False)
    assert not seam_fired.exists()  # the seam lives in the Ray workers only
    on_ray = run_benchmark(root, tmp_path / "ray", two_epochs, names, executor="ray", cpus_per_task=1)
    assert seam_fired.exists()  # one worker died mid-category
    same = [c for c in COLUMNS if c != "train_seconds"]
    assert [{c: r.get(c) for c in same} for r in on_ray] == [
        {c: r.get(c) for c in same} for r in uninterrupted
    ]
    assert all(r.get("error") is None and r["image_auroc"] is not None for r in on_ray)
    for name in names:  # the killed category's second epoch was logged once, by the retry
        assert [
            json.loads(line)["epoch"] for line in (tmp_path / "ray" / name / "train_log.jsonl").open()
        ] == [1, 2]


@needs_ray
def test_predict_on_ray_writes_what_one_process_writes(root: Path, local_ray: None, tmp_path: Path) -> None:
    run = tmp_path / "model"
    fit(CFG.updated(data={"dataset": str(root / "alpha")}), run, progress=False, log=lambda _: None)
    bad = tmp_path / "in" / "000.png"  # unreadable, and its name collides with the test images'
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    inputs = [str(root / "alpha" / "test"), str(bad.parent)]
    one = run_predict(Predictor.load(run, device="cpu"), inputs, tmp_path / "one", progress=False)
    many = run_predict_on_ray(run, inputs, tmp_path / "ray", progress=False, device="cpu", chunk_size=2)
    for timing in ("seconds", "images_per_second"):
        many.pop(timing), one.pop(timing)
    assert many == one
    assert one["predicted"] == 6 and one["failed"] == 1
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "ray").iterdir()) and len(written) == 6 * 3 + 2
    for name in written:
        if name != "summary.json":  # holds the timings
            assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_executor_ray_without_ray_is_a_one_line_error(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    argv = ["benchmark", "--data", str(root), "--output", str(tmp_path / "out"), "--executor", "ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "msflow[cluster]"' in err
    assert not (tmp_path / "out").exists()
    argv = ["predict", "--model", str(tmp_path), "--input", str(root), "--output", str(tmp_path / "p")]
    assert main([*argv, "--executor", "ray"]) == 2
    assert 'pip install "msflow[cluster]"' in capsys.readouterr().err


def test_ray_flags_need_the_ray_executor(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["benchmark", "--data", str(root), "--output", str(tmp_path), "--address", "x:1"]) == 2
    assert "need --executor ray" in capsys.readouterr().err
