"""Peak memory and wall time of ``msflow test``, ``msflow predict`` and ``msflow train`` at several sizes.

    python benchmarks/memory.py --workdir /tmp/msflow-memory            # everything (~30 min on 2 cores)
    python benchmarks/memory.py --workdir /tmp/m --test-sizes 20 100 --predict-sizes 200 --no-train-shape

Synthetic MVTec-layout sets are written once (seeded) under ``--workdir``: smooth grey-level textures
with bright blob defects and their masks. Every measured command runs in a fresh subprocess; its peak
resident memory is the kernel's ``ru_maxrss`` for that child (``os.wait4``), its wall time the elapsed
time around it. Results are printed as a table and written to ``<workdir>/memory.json``. What it is
for: checking that memory stays bounded as test sets and predict folders grow (the streamed metrics,
the on-disk feature cache) before a release or after a change to those paths. Tested by
tests/test_memory_harness.py (the sets it writes, the child's exit code and peak memory).

Measured:

* ``msflow test`` of one small trained model (efficientnet_lite0, 256 px, 1 epoch on 16 images) on
  1024 x 1024 test sets of ``--test-sizes`` images (half defective, with masks), at original resolution;
* ``msflow predict`` on folders of ``--predict-sizes`` images of ``--predict-px`` pixels a side (maps,
  masks and overlays written for every image), with that model or one trained the same way at
  ``--predict-model-size`` px;
* the 568-train / 536-test shape at 1130 x 460 px through ``msflow train --epochs 1``
  (training, calibration and the test evaluation at original resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random grey texture (low-frequency noise up-sampled), like a machined surface."""
    base = rng.normal(128, 18, (max(2, height // 32), max(2, width // 32))).clip(0, 255).astype(np.uint8)
    return np.array(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))


def _defect(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Paint a bright ellipse into ``img`` (in place); returns its mask."""
    h, w = img.shape
    cy, cx = rng.integers(h // 8, h - h // 8), rng.integers(w // 8, w - w // 8)
    ry, rx = rng.integers(max(3, h // 60), max(4, h // 12)), rng.integers(max(3, w // 60), max(4, w // 12))
    yy, xx = np.ogrid[:h, :w]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img[mask] = np.clip(img[mask].astype(int) + 90, 0, 255)
    return mask


def make_category(
    root: Path, n_train: int, n_test: int, width: int, height: int, seed: int, masks: bool = True
) -> Path:
    """An MVTec-layout category: ``n_train`` good training images, ``n_test`` test images (half bad)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, width, height)).save(root / "train/good" / f"{i:05d}.jpg", quality=92)
    for i in range(n_test):
        img = _texture(rng, width, height)
        if i % 2 == 0:
            Image.fromarray(img).save(root / "test/good" / f"{i:05d}.jpg", quality=92)
            continue
        mask = _defect(rng, img)
        Image.fromarray(img).save(root / "test/blob" / f"{i:05d}.jpg", quality=92)
        if masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                root / "ground_truth/blob" / f"{i:05d}_mask.png"
            )
    (root / "done").write_text("ok")
    return root


def make_folder(root: Path, n: int, px: int, seed: int) -> Path:
    """``n`` plain images of ``px`` x ``px`` pixels for ``msflow predict``."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _texture(rng, px, px)
        if i % 5 == 0:
            _defect(rng, img)
        Image.fromarray(img).save(root / "images" / f"{i:06d}.png")
    (root / "done").write_text("ok")
    return root


def measure(argv: list[str], log: Path) -> dict:
    """Run ``python -m msflow argv`` in a fresh process: exit code, wall seconds, peak RSS in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "msflow", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": "msflow " + " ".join(argv),
        "exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--test-sizes", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--predict-sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--predict-px", type=int, default=256, help="side of the predict images")
    parser.add_argument(
        "--predict-model-size", type=int, default=256, help="input size of the model used for predict"
    )
    parser.add_argument("--no-test", action="store_true", help="skip the msflow test measurements")
    parser.add_argument("--no-train-shape", action="store_true", help="skip the 568/536 1130x460 run")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def run(name: str, argv: list[str]) -> dict:
        row = {"name": name, **measure(argv, work / f"{name}.log")}
        rows.append(row)
        print(
            f"{name:<24} exit {row['exit_code']}  {row['seconds']:>8.1f} s  {row['peak_rss_mib']:>8.1f} MiB"
        )
        if row["exit_code"]:
            print(f"  see {work / (name + '.log')}")
        return row

    model_flags = ["--backbone", "efficientnet_lite0", "--image-size", "256", "--epochs", "1", "--quiet"]
    model = work / "model"
    need_model = (args.test_sizes and not args.no_test) or (
        args.predict_sizes and args.predict_model_size == 256
    )
    if need_model and not (model / "model.json").is_file():
        small = make_category(work / "small", 16, 4, 1024, 1024, seed=1)
        run("train-small", ["train", "--data", str(small), "--output", str(model), *model_flags])
    for n in [] if args.no_test else args.test_sizes:
        data = make_category(work / f"test{n}", 2, n, 1024, 1024, seed=100 + n)
        out = work / f"test{n}-report"
        run(
            f"test-{n}x1024",
            ["test", "--model", str(model), "--data", str(data), "--output", str(out), "--quiet"],
        )
    predict_model = model
    if args.predict_sizes and args.predict_model_size != 256:
        predict_model = work / f"model{args.predict_model_size}"
        if not (predict_model / "model.json").is_file():
            small = make_category(work / "small", 16, 4, 1024, 1024, seed=1)
            flags = [*model_flags[:2], "--image-size", str(args.predict_model_size), *model_flags[4:]]
            run(
                "train-small-predict", ["train", "--data", str(small), "--output", str(predict_model), *flags]
            )
    for n in args.predict_sizes:
        folder = make_folder(work / f"predict{n}", n, args.predict_px, seed=200 + n)
        out = work / f"predict{n}-out"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        argv = [
            "predict",
            "--model",
            str(predict_model),
            "--input",
            str(folder / "images"),
            "--output",
            str(out),
        ]
        run(
            f"predict-{n}x{args.predict_px}-model{args.predict_model_size}",
            [*argv, "--batch-size", "8", "--quiet"],
        )
    if not args.no_train_shape:
        data = make_category(work / "shape568", 568, 536, 1130, 460, seed=3)
        out = work / "shape568-run"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run("train-568-536x1130x460", ["train", "--data", str(data), "--output", str(out), *model_flags])
    results = work / "memory.json"
    previous = json.loads(results.read_text()) if results.is_file() else []
    results.write_text(json.dumps(previous + rows, indent=2))
    print(f"results: {work / 'memory.json'}")


if __name__ == "__main__":
    main()
