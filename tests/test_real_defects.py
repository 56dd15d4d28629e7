"""benchmarks/real_defects.py: the area and contrast of real defects, at the model's input size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def real_defects(benchmark_module):
    return benchmark_module("real_defects")


def _category(root, scratch: bool = True):
    """A 40 x 40 checkerboard of grey 96/104 (mean 100, spread 4) with a bright 10 x 10 scratch (130)
    and, in a second image, a dark one-pixel pit (60); MVTec layout with the masks."""
    board = np.where(np.indices((40, 40)).sum(0) % 2 == 0, 96, 104).astype(np.uint8)
    defects = {"pit": (slice(21, 22), slice(21, 22), 60)}
    if scratch:
        defects["scratch"] = (slice(15, 25), slice(15, 25), 130)
    for name, (rows, cols, level) in defects.items():
        image, mask = board.copy(), np.zeros((40, 40), np.uint8)
        image[rows, cols], mask[rows, cols] = level, 255
        (root / "test" / name).mkdir(parents=True)
        (root / "ground_truth" / name).mkdir(parents=True)
        Image.fromarray(image).convert("RGB").save(root / "test" / name / "000.png")
        Image.fromarray(mask).save(root / "ground_truth" / name / "000_mask.png")
    return root


def test_area_and_contrast_of_each_mask(tmp_path, real_defects):
    table = real_defects.measure(_category(tmp_path), (40, 40))
    pit, scratch = table  # sorted by defect name
    assert pit[0] == pytest.approx(1 / 1600) and scratch[0] == pytest.approx(100 / 1600)
    # The scratch's ring (2-4 px outside it) holds as many 96s as 104s: mean 100, spread 4.
    assert scratch[1] == pytest.approx(130 - 100) and scratch[2] == pytest.approx(30 / 4)
    # The pit's ring: the pixels 2, 3 and 4 steps away (8 + 12 + 16); those an even number of steps
    # away share the pit's square colour (96), so a third are 104: mean 98.67, spread 8 * sqrt(2) / 3.
    ring_mean, ring_std = (24 * 96 + 12 * 104) / 36, 8 * 2**0.5 / 3
    assert pit[1] == pytest.approx(ring_mean - 60, rel=1e-5)
    assert pit[2] == pytest.approx((ring_mean - 60) / ring_std, rel=1e-5)


def test_a_mask_too_small_for_the_input_size_is_left_out(tmp_path, real_defects):
    table = real_defects.measure(_category(tmp_path), (8, 8))
    assert len(table) == 1 and table[0][0] == pytest.approx(100 / 1600)  # the scratch only
    with pytest.raises(SystemExit, match="no mask is visible at 8 x 8"):
        real_defects.measure(_category(tmp_path / "pit_only", scratch=False), (8, 8))


def test_prints_the_percentiles(tmp_path, real_defects, capsys):
    real_defects.main([str(_category(tmp_path)), "40", "40"])
    out = capsys.readouterr().out
    assert "2 masks visible at 40 x 40" in out
    area = next(line for line in out.splitlines() if "area, % of the image" in line).split()[-5:]
    assert float(area[0]) == pytest.approx(0.0625 + 0.05 * (6.25 - 0.0625), abs=1e-3)  # 5th percentile
    assert float(area[-1]) == pytest.approx(6.25 - 0.05 * (6.25 - 0.0625), abs=1e-3)


def test_bad_folders_are_one_line_naming_the_file(tmp_path, real_defects):
    with pytest.raises(SystemExit, match="no masks in ground_truth"):
        real_defects.measure(tmp_path, (40, 40))
    root = _category(tmp_path / "cat")
    (root / "test" / "pit" / "000.png").unlink()
    with pytest.raises(SystemExit, match=r"000_mask.png: no test image 000\.\* in test/pit"):
        real_defects.measure(root, (40, 40))
