"""When do tiles pay? Whole images resized vs tiles, on a seeded set of large images with small defects.

    PYTHONPATH=src python benchmarks/tile_study.py --out study/tiles [--epochs 10] [--modes whole tile]

The set (built once into ``OUT/data`` in MVTec layout): "panels" of ``--rows`` x ``--cols`` ELPV
solar cells (300 x 300 px electroluminescence images of defect-free monocrystalline cells, from the
elpv-dataset package; 3 x 4 cells = 900 x 1200 px), cells drawn at random. A defective panel gets one
synthetic defect (``msflow.data.synthetic``: patch, scratch or blob) drawn into ONE cell, so its area is
0.05 % to 3 % of a cell (45 to 2,700 px; about 2 to 100 px after squashing the panel to 256 x 256).
Everything is seeded; the set never touches the ELPV defect labels.

Each mode trains with ``msflow.train.fit.fit`` (the same code as ``msflow train``) and reports the test
image AUROC, pixel AUROC (at the original resolution) and wall time, with the load average:

- ``whole``: the panel resized to ``--size`` (the default without tiles);
- ``tile``:  tiles of ``--size`` px with ``--overlap``, each at its own resolution (``--tile S
  --image-size S``).

Results go to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from msflow.config import Config
from msflow.data.datasets import elpv_samples
from msflow.data.images import read_image, to_uint8
from msflow.data.synthetic import KINDS, add_defect
from msflow.train.fit import fit

CELL = 300  # px, an ELPV cell


def _panel(rng: np.random.Generator, cells: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    picks = rng.choice(len(cells), rows * cols, replace=False)
    grid = [np.concatenate([cells[picks[r * cols + c]] for c in range(cols)], axis=1) for r in range(rows)]
    return np.concatenate(grid, axis=0)


def build_set(out: Path, rows: int, cols: int, n_train: int, n_good: int, n_bad: int, seed: int) -> Path:
    """Write the panels (see the module doc) to ``out`` in MVTec layout; returns ``out``."""
    if (out / "train").is_dir():
        return out
    train, _ = elpv_samples("mono")  # good cells only; the ELPV test split and its labels are not read
    cells = [to_uint8(read_image(s.image)) for s in train]  # every ELPV cell is 300 x 300 px
    rng = np.random.default_rng(seed)
    for folder, count in (("train/good", n_train), ("test/good", n_good)):
        (out / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(_panel(rng, cells, rows, cols)).save(out / folder / f"{i:03d}.png")
    (out / "test/defect").mkdir(parents=True)
    (out / "ground_truth/defect").mkdir(parents=True)
    for i in range(n_bad):
        panel = _panel(rng, cells, rows, cols)
        r, c = int(rng.integers(rows)), int(rng.integers(cols))
        box = (slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL))
        defective, cell_mask = add_defect(panel[box], rng, KINDS[i % len(KINDS)])
        panel[box] = np.asarray(defective)
        mask = np.zeros(panel.shape[:2], np.uint8)
        mask[box] = cell_mask * 255
        Image.fromarray(panel).save(out / "test/defect" / f"{i:03d}.png")
        Image.fromarray(mask).save(out / "ground_truth/defect" / f"{i:03d}_mask.png")
    return out


def run_mode(mode: str, data: Path, out: Path, size: int, overlap: float, epochs: int) -> dict:
    tile = {"tile": size, "tile_overlap": overlap} if mode == "tile" else {}
    cfg = Config().updated(
        model={"image_size": size, **tile},
        data={"dataset": str(data), "holdout_fraction": 0.1},
        train={"epochs": epochs, "stop": "schedule", "device": "cpu", "cache": "memory"},
    )
    run = out / f"run_{mode}"
    shutil.rmtree(run, ignore_errors=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    metrics = fit(cfg, run, progress=False)
    seconds = time.perf_counter() - start
    training = json.loads((run / "model.json").read_text())["training"]
    return {
        "mode": mode,
        "image_size": size,
        **tile,
        "epochs": epochs,
        "image_auroc": round(metrics["image_auroc"], 2),
        "pixel_auroc": round(metrics["pixel_auroc"], 2),
        "aupro": round(metrics["aupro"], 2),
        "train_seconds": training["train_seconds"],
        "training_tiles": training.get("training_tiles"),
        "total_seconds": round(seconds, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--modes", nargs="+", default=["whole", "tile"], choices=["whole", "tile"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--test-good", type=int, default=10)
    p.add_argument("--test-bad", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    data = build_set(out / "data", args.rows, args.cols, args.train, args.test_good, args.test_bad, args.seed)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    for mode in args.modes:
        result = run_mode(mode, data, out, args.size, args.overlap, args.epochs)
        result["panel"] = f"{args.rows * CELL}x{args.cols * CELL}"
        print(json.dumps(result), flush=True)
        results.append(result)
        results_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
