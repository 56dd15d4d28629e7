"""Real defect sets with pixel masks, converted to the MVTec layout (issue 20). Nothing here ships.

    python benchmarks/real_sets.py bsdata --source SRC --out /work/scratch/realdata/bsdata
    python benchmarks/real_sets.py crackforest --source SRC --out /work/scratch/realdata/crackforest

``SRC`` is a checkout of the public repository named in docs/datasets.md (its source, commit and
licence are recorded there); the images never enter this repository. Both converters are
deterministic given ``--seed`` and write ``train/good``, ``test/good``, ``test/<defect>`` and
``ground_truth/<defect>/<stem>_mask.png`` (0/255) at the images' natural resolution (no resizing).

- ``bsdata``: BSData (ball-screw drive surfaces, pitting, labelme polygons). By default only the
  ``crop_2`` view (1130 x 460 px, the view with most images) is used, so train and test show the same
  scene; ``--view all`` keeps every image (``crop_1`` at 1540 x 645 and the ~2,700 x 900 images of a
  second drive type, which are all annotated, so they appear only among the defects). An image
  without an annotation file is defect-free (the dataset annotates every image that shows pitting);
  a seeded shuffle of those gives ``train/good`` (``--train``) and ``test/good`` (``--test-good``);
  every annotated image is ``test/pitting`` with its polygons filled as the mask.
- ``crackforest``: CrackForest (road cracks, every image has one). The labelled images are split by
  image (seeded; ``--train-share`` of them give training crops only), so no road surface is in both
  train and test. Each image is cut into ``--crop`` x ``--crop`` tiles on a grid of stride
  ``crop // 2`` (train) or ``crop`` (test). A tile is *good* when no crack pixel lies within
  ``--margin`` px of it (the annotation is a thin line; the margin keeps its unmarked fringe out),
  and *defective* (test only) when at least ``--min-defect`` of its pixels are crack.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

BSDATA_VIEWS = {"crop_2": "*_crop_2.jpg", "all": "*.jpg"}


def _save(image: Image.Image, mask: np.ndarray | None, out: Path, split: str, kind: str, stem: str) -> None:
    """One image (PNG, lossless from here on) and, for a defect, its 0/255 mask."""
    folder = out / split / kind
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{stem}.png")
    if mask is not None:
        gt = out / "ground_truth" / kind
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{stem}_mask.png")


def polygon_mask(shapes: list[dict], size: tuple[int, int]) -> np.ndarray:
    """labelme shapes (polygons) filled into a boolean mask of ``size`` = (width, height)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        points = [(float(x), float(y)) for x, y in shape["points"]]
        if shape.get("shape_type", "polygon") != "polygon" or len(points) < 3:
            raise ValueError(
                f"unsupported labelme shape {shape.get('shape_type')!r} with {len(points)} points"
            )
        draw.polygon(points, fill=255, outline=255)
    return np.asarray(canvas) > 0


def convert_bsdata(
    source: Path, out: Path, seed: int = 0, train: int = 300, test_good: int = 100, view: str = "crop_2"
) -> dict:
    """BSData's images of ``view`` (a key of BSDATA_VIEWS) in MVTec layout; returns the counts written."""
    images = sorted((source / "data").glob(BSDATA_VIEWS[view]))
    labels = {p.stem: p for p in (source / "label").glob("*.json")}
    good = [p for p in images if p.stem not in labels]
    bad = [p for p in images if p.stem in labels]
    random.Random(seed).shuffle(good)
    if len(good) < train + test_good:
        raise ValueError(f"{source}: {len(good)} defect-free images, asked for {train} + {test_good}")
    for split, kind, chosen in (
        ("train", "good", good[:train]),
        ("test", "good", good[train : train + test_good]),
    ):
        for path in chosen:
            _save(Image.open(path).convert("RGB"), None, out, split, kind, path.stem)
    for path in bad:
        image = Image.open(path).convert("RGB")
        shapes = json.loads(labels[path.stem].read_text())["shapes"]
        _save(image, polygon_mask(shapes, image.size), out, "test", "pitting", path.stem)
    return {"train/good": train, "test/good": test_good, "test/pitting": len(bad)}


def crack_mask(mat_file: Path) -> np.ndarray:
    """CrackForest's ground truth: ``groundTruth.Segmentation`` is 1 (background) or 2 (crack)."""
    from scipy.io import loadmat

    segmentation = loadmat(mat_file)["groundTruth"][0, 0]["Segmentation"]
    return np.asarray(segmentation) == 2


def tiles(shape: tuple[int, int], crop: int, stride: int) -> Iterator[tuple[int, int]]:
    """Top-left corners of the crop x crop tiles of an image of ``shape`` = (height, width)."""
    for y in range(0, shape[0] - crop + 1, stride):
        for x in range(0, shape[1] - crop + 1, stride):
            yield y, x


def _crack_tiles(
    image: Image.Image, mask: np.ndarray, crop: int, stride: int, margin: int, min_defect: float
):
    """(kind, y, x) for every good or clearly defective tile; tiles in between are skipped."""
    near = ndimage.binary_dilation(mask, iterations=margin) if margin > 0 else mask
    for y, x in tiles(mask.shape, crop, stride):
        if not near[y : y + crop, x : x + crop].any():
            yield "good", y, x
        elif mask[y : y + crop, x : x + crop].mean() >= min_defect:
            yield "crack", y, x


def convert_crackforest(
    source: Path,
    out: Path,
    seed: int = 0,
    crop: int = 128,
    margin: int = 8,
    min_defect: float = 0.005,
    train_share: float = 0.6,
) -> dict:
    """CrackForest cut into tiles in MVTec layout (see the module docstring); returns the counts written."""
    stems = sorted(p.stem for p in (source / "groundTruth").glob("*.mat"))
    random.Random(seed).shuffle(stems)
    n_train = round(len(stems) * train_share)
    counts = {"train/good": 0, "test/good": 0, "test/crack": 0}
    for index, stem in enumerate(stems):
        split = "train" if index < n_train else "test"
        image = Image.open(source / "image" / f"{stem}.jpg").convert("RGB")
        mask = crack_mask(source / "groundTruth" / f"{stem}.mat")
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{stem}: mask {mask.shape} vs image {image.size}")
        stride = crop // 2 if split == "train" else crop
        for kind, y, x in _crack_tiles(image, mask, crop, stride, margin, min_defect):
            if split == "train" and kind != "good":
                continue
            tile = image.crop((x, y, x + crop, y + crop))
            tile_mask = mask[y : y + crop, x : x + crop] if kind != "good" else None
            _save(tile, tile_mask, out, split, kind, f"{stem}_y{y:03d}_x{x:03d}")
            counts[f"{split}/{kind}"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=("bsdata", "crackforest"))
    parser.add_argument("--source", type=Path, required=True, help="checkout of the public repository")
    parser.add_argument("--out", type=Path, required=True, help="category folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=300, help="bsdata: training images")
    parser.add_argument("--test-good", type=int, default=100, help="bsdata: good test images")
    parser.add_argument("--view", choices=sorted(BSDATA_VIEWS), default="crop_2", help="bsdata: which images")
    parser.add_argument("--crop", type=int, default=128, help="crackforest: tile side in pixels")
    parser.add_argument("--margin", type=int, default=8, help="crackforest: crack-free margin of a good tile")
    parser.add_argument(
        "--min-defect", type=float, default=0.005, help="crackforest: crack share of a defect tile"
    )
    parser.add_argument(
        "--train-share", type=float, default=0.6, help="crackforest: share of images for training"
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; remove it first (nothing is overwritten)")
    if args.dataset == "bsdata":
        counts = convert_bsdata(args.source, args.out, args.seed, args.train, args.test_good, args.view)
    else:
        counts = convert_crackforest(
            args.source, args.out, args.seed, args.crop, args.margin, args.min_defect, args.train_share
        )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
