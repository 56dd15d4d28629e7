"""benchmarks/memory.py: the synthetic sets it writes, and the peak memory and exit code of a child."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def memory(benchmark_module):
    return benchmark_module("memory")


def test_category_is_mvtec_layout_with_masks_on_the_bright_defects(tmp_path, memory):
    root = memory.make_category(tmp_path / "cat", n_train=3, n_test=4, width=96, height=64, seed=0)
    assert len(list((root / "train/good").iterdir())) == 3
    good, bad = sorted((root / "test/good").iterdir()), sorted((root / "test/blob").iterdir())
    assert len(good) == len(bad) == 2 and Image.open(bad[0]).size == (96, 64)
    for image in bad:
        mask = np.asarray(Image.open(root / "ground_truth/blob" / f"{image.stem}_mask.png")) > 0
        grey = np.asarray(Image.open(image), np.float32)
        assert mask.any() and grey[mask].mean() > grey[~mask].mean() + 40  # painted 90 levels brighter
    (root / "train/good" / "00000.jpg").unlink()  # written once: a finished set is not rewritten
    memory.make_category(root, n_train=3, n_test=4, width=96, height=64, seed=0)
    assert not (root / "train/good" / "00000.jpg").exists()


def test_measure_reports_the_child_exit_code_and_peak_memory(tmp_path, memory):
    ok = memory.measure(["--version"], tmp_path / "ok.log")
    assert ok["command"] == "msflow --version" and ok["exit_code"] == 0
    assert "msflow" in (tmp_path / "ok.log").read_text()
    assert 10 < ok["peak_rss_mib"] < 4096 and ok["seconds"] > 0  # the child's own peak, in MiB
    bad = memory.measure(["test", "--model", str(tmp_path / "none")], tmp_path / "bad.log")
    assert bad["exit_code"] == 2 and "error:" in (tmp_path / "bad.log").read_text()


def test_writes_its_rows_to_memory_json_and_keeps_earlier_ones(tmp_path, memory, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "memory.json").write_text('[{"name": "earlier"}]')
    memory.main(["--workdir", str(work), "--no-test", "--no-train-shape", "--predict-sizes"])
    import json

    assert json.loads((work / "memory.json").read_text()) == [{"name": "earlier"}]
    assert f"results: {work / 'memory.json'}" in capsys.readouterr().out
