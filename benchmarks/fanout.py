"""A plant-sized fan-out through Ray, measured: many small categories, 1 worker against 2 (issue 24).

    PYTHONPATH=src python -m benchmarks.fanout --out /tmp/fanout --categories 12 --workers 1 2

Writes ``--categories`` seeded synthetic categories in MVTec layout (a VisA-sized plant has 12):
smooth noise textures, each category its own grain and colour, and defective test images made by
:func:`msflow.data.synthetic.add_defect` with their exact masks. Then, for each worker count W, it
starts a local Ray instance with W CPUs and trains every category as one task of 1 CPU through
:func:`msflow.cluster.run_tasks`, the path of ``msflow benchmark --executor ray``. Each task reports:

- ``queued_s``:  submission to the task's start (a worker process's start and imports, then waiting
  for a free CPU: it grows with the number of tasks ahead of it);
- ``import_s``:  importing msflow's training code in the worker (once per worker process);
- ``model_build_s``, ``extraction_s``, ``train_s`` (the flows' epochs), ``after_train_s`` (label-free
  choices, calibration, saving, test evaluation): fit's own figures from the run's model.json;
- ``peak_rss_mb``: the worker process's peak resident memory when the task ends (``ru_maxrss``; Ray
  reuses a worker for several tasks, so this is the peak over the tasks it ran so far).

``fanout.json`` holds every figure; the table printed at the end gives, per worker count, the wall
time (Ray start excluded, then its start on its own), the scaling efficiency T1 / (W x TW) and the
median and maximum of the per-task figures. Nothing is downloaded (the backbone is not pretrained).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

TASK_FIGURES = (
    "fit_s",
    "import_s",
    "model_build_s",
    "extraction_s",
    "train_s",
    "after_train_s",
    "peak_rss_mb",
)


def write_category(root: Path, index: int, seed: int, images: int, size: int) -> Path:
    """Category ``index``: ``images`` good training images, ``images // 4`` good and as many defective
    test images with masks, all from ``default_rng([seed, index])`` (the same files for the same seed)."""
    from msflow.data.synthetic import add_defect

    rng = np.random.default_rng([seed, index])
    grain = int(rng.integers(3, 9))  # texture scale: each category looks different
    colour = rng.uniform(60, 190, 3)

    def texture() -> np.ndarray:
        base = rng.normal(0, 25, (size // grain + 1, size // grain + 1, 3)) + colour
        small = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))

    folder = root / f"category_{index:02d}"
    n_test = max(1, images // 4)
    for split, count in (("train/good", images), ("test/good", n_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(texture()).save(folder / split / f"{i:03d}.png")
    (folder / "test" / "synthetic").mkdir(parents=True, exist_ok=True)
    (folder / "ground_truth" / "synthetic").mkdir(parents=True, exist_ok=True)
    for i in range(n_test):
        defective, mask = add_defect(texture(), rng)
        defective.save(folder / "test" / "synthetic" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            folder / "ground_truth" / "synthetic" / f"{i:03d}_mask.png"
        )
    return folder


def timed_category(submitted: float, name: str, cfg_dict: dict, run_dir: str) -> dict:
    """One category inside a Ray task: fit, then its timings and the worker's peak memory."""
    import resource

    started = time.time()
    t0 = time.perf_counter()
    from msflow.config import Config
    from msflow.train.fit import fit

    imported = time.perf_counter() - t0
    fit(Config.from_dict(cfg_dict), run_dir, progress=False, log=lambda _: None)
    total = time.perf_counter() - t0 - imported
    training = json.loads((Path(run_dir) / "model.json").read_text())["training"]
    return {
        "category": name,
        "queued_s": started - submitted,
        "import_s": imported,
        "model_build_s": training["model_build_seconds"],
        "extraction_s": training["feature_extraction_seconds"],
        "train_s": training["train_seconds"] - training["feature_extraction_seconds"],
        "after_train_s": total - training["train_seconds"] - training["model_build_seconds"],
        "fit_s": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "pid": os.getpid(),
    }


def fan_out(categories: list[Path], cfg: object, out: Path, workers: int) -> dict:
    """Every category as a Ray task on a fresh local instance of ``workers`` CPUs."""
    import ray

    from msflow.cluster import run_tasks

    if __name__ != "__main__":  # imported (tests): ship this module's task function by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    try:
        begin = time.perf_counter()
        jobs = [
            (time.time(), c.name, cfg.updated(data={"dataset": str(c)}).to_dict(), str(out / c.name))  # type: ignore[attr-defined]
            for c in categories
        ]
        tasks = []
        for _, result, error in run_tasks(timed_category, jobs, cpus_per_task=1):
            if error is not None:
                raise RuntimeError(f"a category failed: {error}")
            tasks.append(result)
        wall = time.perf_counter() - begin
    finally:
        ray.shutdown()
    return {"workers": workers, "ray_start_s": ray_start, "wall_s": wall, "tasks": tasks}


def summary(runs: list[dict]) -> list[dict]:
    """Per worker count: wall time, efficiency against the first count, per-task medians and maxima."""
    first = runs[0]
    rows = []
    for run in runs:
        tasks = run["tasks"]
        row = {
            "workers": run["workers"],
            "categories": len(tasks),
            "ray_start_s": round(run["ray_start_s"], 2),
            "wall_s": round(run["wall_s"], 1),
            "efficiency": round(first["wall_s"] * first["workers"] / (run["workers"] * run["wall_s"]), 3),
        }
        for key in TASK_FIGURES:
            values = [t[key] for t in tasks]
            row[f"{key}_median"] = round(statistics.median(values), 2)
            row[f"{key}_max"] = round(max(values), 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the categories, the runs and fanout.json")
    p.add_argument("--categories", type=int, default=12)
    p.add_argument("--images", type=int, default=16, help="good training images per category")
    p.add_argument("--size", type=int, default=64, help="image and model input size (px)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from msflow.config import Config

    out = Path(args.out)
    categories = [
        write_category(out / "data", i, args.seed, args.images, args.size) for i in range(args.categories)
    ]
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": args.size},
        train={"epochs": args.epochs, "batch_size": 8, "device": "cpu"},
    )
    runs = [fan_out(categories, cfg, out / f"runs_w{w}", w) for w in args.workers]
    rows = summary(runs)
    (out / "fanout.json").write_text(
        json.dumps({"args": vars(args), "summary": rows, "runs": runs}, indent=2)
    )
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
