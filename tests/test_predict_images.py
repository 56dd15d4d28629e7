"""``msflow predict --images all|overlay`` and ``--no-images``: which files are written per image."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from msflow.cli import main

try:
    from serve_fixtures import png_bytes, shared_run_dir
except ImportError:  # tests/ became a package
    from .serve_fixtures import png_bytes, shared_run_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for i in range(3):
        (folder / f"part{i}.png").write_bytes(png_bytes(40 + 8 * i, seed=i))
    return folder


@pytest.mark.parametrize(
    ("flags", "suffixes"),
    [
        ([], {"_overlay.png", "_map.png", "_mask.png"}),
        (["--images", "all"], {"_overlay.png", "_map.png", "_mask.png"}),
        (["--images", "overlay"], {"_overlay.png"}),
        (["--no-images"], set()),
    ],
)
def test_images_written_per_image(inputs: Path, tmp_path: Path, flags: list[str], suffixes: set[str]) -> None:
    out = tmp_path / "out"
    argv = ["predict", "--model", str(shared_run_dir()), "--input", str(inputs), "--output", str(out)]
    assert main([*argv, "--runtime", "torch", "--quiet", *flags]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {f"part{i}{s}" for i in range(3) for s in suffixes}
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["decision"] in ("good", "defective") for r in rows)
    assert all(bool(r["overlay"]) == bool(suffixes) for r in rows)


def test_no_images_and_images_exclude_each_other(inputs: Path, tmp_path: Path, capsys) -> None:
    argv = ["predict", "--model", str(shared_run_dir()), "--input", str(inputs), "--output", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*argv, "--no-images", "--images", "overlay"])
    assert "not allowed with" in capsys.readouterr().err
