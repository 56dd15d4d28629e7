"""How large and how faint a dataset's real defects are, at the model's input size (what the synthetic
proxy ``msflow.data.synthetic`` is drawn to resemble).

    python benchmarks/real_defects.py DATA H W

DATA: a folder in MVTec layout with ``ground_truth``; H, W: the model's input size. For every mask:
its share of the image (original size), and at H x W (image bilinear, mask nearest, as the check
compares them) the difference between the mean grey level inside the mask and in a ring 2-4 pixels
outside it, in grey levels and in standard deviations of that ring. Prints the 5/25/50/75/95 %
percentiles. A report only; nothing reads it. What it is for: telling whether the synthetic check's
defects (their area range and their contrast relative to the surroundings) resemble a data set's real
ones, before trusting the label-free choices on it; docs/results.md ("The proxy made to look like real
defects") holds its figures on CrackForest and BSData. Tested by tests/test_real_defects.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def defect_stats(image: Path, mask: Path, size: tuple[int, int]) -> tuple[float, float, float] | None:
    """(area share, contrast in grey levels, contrast in ring standard deviations), or None when the
    mask vanishes at ``size``."""
    h, w = size
    grey = np.asarray(Image.open(image).convert("L").resize((w, h), Image.Resampling.BILINEAR), np.float32)
    full = np.asarray(Image.open(mask).convert("L")) > 0
    small = np.asarray(Image.fromarray(full.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)) > 0
    if not small.any():
        return None
    ring = ndimage.binary_dilation(small, iterations=4) & ~ndimage.binary_dilation(small, iterations=1)
    contrast = abs(float(grey[small].mean() - grey[ring].mean()))
    return float(full.mean()), contrast, contrast / max(float(grey[ring].std()), 1e-6)


def measure(data: Path, size: tuple[int, int]) -> np.ndarray:
    """One row (area share, contrast, contrast / ring std) per mask of ``data`` still visible at ``size``."""
    masks = sorted((data / "ground_truth").glob("*/*"))
    if not masks:
        raise SystemExit(f"{data}: no masks in ground_truth/<defect>/ (an MVTec-layout folder is needed)")
    rows = []
    for mask in masks:
        stem = mask.stem.removesuffix("_mask")
        images = sorted((data / "test" / mask.parent.name).glob(stem + ".*"))
        if not images:
            raise SystemExit(f"{mask}: no test image {stem}.* in test/{mask.parent.name}")
        found = defect_stats(images[0], mask, size)
        if found is not None:
            rows.append(found)
    if not rows:
        raise SystemExit(f"{data}: no mask is visible at {size[0]} x {size[1]}")
    return np.array(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("height", type=int)
    parser.add_argument("width", type=int)
    args = parser.parse_args(argv)
    table = measure(args.data, (args.height, args.width))
    print(
        f"{args.data}: {len(table)} masks visible at {args.height} x {args.width}; percentiles 5/25/50/75/95"
    )
    for name, column in (
        ("area, % of the image", table[:, 0] * 100),
        ("contrast, grey levels", table[:, 1]),
        ("contrast / ring std", table[:, 2]),
    ):
        print(f"  {name:24}", " ".join(f"{v:8.3f}" for v in np.percentile(column, [5, 25, 50, 75, 95])))


if __name__ == "__main__":
    main()
