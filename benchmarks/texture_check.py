"""Hard textures, before and after issue 13's defaults: does anything that worked drop?

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/texture_check.py --out texture_check --epochs 20

For each texture of ``benchmarks/texture_sets.py`` (written under ``--out/data`` if absent) it trains

- ``before``: the previous defaults at the same cost:
  ``msflow train --score official --image-size 256 --stop schedule --epochs E``;
- ``after``:  today's defaults with the same cap: ``msflow train --epochs E`` (plateau rule, ``auto``
  image size, ``logp:0.01``);

and re-scores each run with the other one's image score (``msflow test --model RUN --score ...``), so
that the score's own effect is separated from the training length's. ``--parallel 2`` trains a
texture's two runs side by side (both see the same machine load). Prints a table and writes
``--out/texture_check.json`` with every metric, the epochs each run trained, wall times and the load
average (``os.getloadavg``) before and after each texture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, str(ROOT))
from benchmarks.texture_sets import TEXTURES, write_texture  # noqa: E402

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def msflow(args: list[str], log: Path) -> float:
    """Run ``python -m msflow ARGS`` (output to ``log``); return its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(
            [sys.executable, "-m", "msflow", *args, "--quiet"], stdout=f, stderr=subprocess.STDOUT, check=True
        )
    return time.perf_counter() - start


def epochs_trained(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return max(int(r["epoch"]) for r in rows if "epoch" in r)


def check(texture: str, data: Path, out: Path, epochs: int, parallel: int) -> dict:
    runs = {
        "before": [
            "--score",
            "official",
            "--image-size",
            "256",
            "--stop",
            "schedule",
            "--epochs",
            str(epochs),
        ],
        "after": ["--epochs", str(epochs)],
    }
    load_start = os.getloadavg()

    def train(name: str) -> dict:
        run = out / "runs" / f"{texture}-{name}"
        args = ["train", "--data", str(data / texture), "--output", str(run), *runs[name]]
        wall = msflow(args, out / f"{texture}-{name}.log")
        model = json.loads((run / "model.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        return {
            "command": "msflow " + " ".join(args),
            "wall_seconds": round(wall, 1),
            "epochs": epochs_trained(run),
            "image_size": model.get("config", {}).get("model", {}).get("image_size"),
            "training": model.get("training"),
            **{k: metrics[k] for k in KEYS},
            "per_defect_type": metrics.get("per_defect_type"),
        }

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        result = dict(zip(runs, pool.map(train, runs), strict=True))
    # Each run scored with the other's image score: same latents, only the reduction to a number differs.
    for name, score in (("before", "logp:0.01"), ("after", "official")):
        run = out / "runs" / f"{texture}-{name}"
        rescored = out / "runs" / f"{texture}-{name}-rescored-{score.replace(':', '_')}"
        msflow(
            ["test", "--model", str(run), "--score", score, "--output", str(rescored)],
            out / f"{rescored.name}.log",
        )
        metrics = json.loads((rescored / "metrics.json").read_text())
        result[f"{name}_rescored"] = {"score": score, **{k: metrics[k] for k in KEYS}}
    result["load_average_start"] = [round(x, 2) for x in load_start]
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _row(label: str, texture: str, epochs: str, m: dict, wall: str) -> str:
    numbers = " ".join(f"{m[k]:9.2f}" for k in KEYS)
    return f"{label:44s} {texture:8s} {epochs:>6s} {numbers} {wall:>7s}"


def table(results: dict) -> str:
    rows = [
        ("before", "before: official score, 256, schedule"),
        ("before_rescored", "before run, re-scored logp:0.01"),
        ("after", "after: defaults (plateau, auto size, auto score)"),
        ("after_rescored", "after run, re-scored official"),
    ]
    header = " ".join(f"{k:>9s}" for k in ("img AUROC", "pix AUROC", "AUPRO"))
    lines = [f"{'run':44s} {'texture':8s} {'epochs':>6s} {header} {'wall s':>7s}"]
    for key, label in rows:
        for texture, r in results.items():
            base = r[key.removesuffix("_rescored")]
            lines.append(_row(label, texture, str(base["epochs"]), r[key], f"{base['wall_seconds']:.0f}"))
        means = {k: sum(r[key][k] for r in results.values()) / len(results) for k in KEYS}
        lines.append(_row(label, "mean", "", means, ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=20, help="E: the before schedule and the after cap")
    ap.add_argument("--textures", nargs="+", default=list(TEXTURES), choices=TEXTURES)
    ap.add_argument("--seed", type=int, default=0, help="texture_sets seed")
    ap.add_argument(
        "--parallel", type=int, default=1, choices=(1, 2), help="train before and after side by side"
    )
    args = ap.parse_args(argv)
    data = args.out / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "texture_check.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for texture in args.textures:
        if texture in results:  # resumable: a finished texture is kept
            continue
        if not (data / texture).is_dir():
            write_texture(data, texture, args.seed)
        results[texture] = check(texture, data, args.out, args.epochs, args.parallel)
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{texture} done", flush=True)
    print(table({t: results[t] for t in args.textures}))


if __name__ == "__main__":
    main()
