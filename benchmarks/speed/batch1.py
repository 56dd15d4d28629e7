"""Batch-1 latency and batch-8 throughput of msflow's torch path against the reference path, per thread count.

    python -m benchmarks.speed.batch1 [--backbone efficientnet_lite0] [--image-size 256] [--threads 1 2]

Three paths run the same random model on the same images: ``torch`` (msflow's runner, what ``msflow
predict --runtime torch`` runs), ``torch NCHW input`` (the same with the backbone's input left in NCHW,
the path before the backbone ran channels-last: the before/after of that change in one process) and
``reference`` (``benchmarks/reference.py``, the official way). Rounds are interleaved, each call after
a quiet gap, so that load from other processes hits every path alike; the minimum of the rounds is the
figure (the median beside it), in wall and in CPU time (CPU time is the latency at 1 thread on a busy
machine). The load average is printed with every thread count.

``--onnx`` adds onnxruntime on the model's export as a fourth path, timed last in each round;
``--gap 0`` drops the quiet gap. Both together time torch right after onnxruntime, as ``msflow bench``
did before the gap: onnxruntime's worker threads keep spinning for ~20 ms after a run, and at 2
threads on 2 cores the next path shares its cores with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def paths(backbone: str, image_size: int, onnx: bool = False) -> dict:
    """name -> fn(batch) of the three paths over one random model."""
    import torch

    from benchmarks.reference import ReferencePath
    from msflow.config import ModelConfig
    from msflow.infer.runtime import runner
    from msflow.model.msflow import MSFlow

    torch.manual_seed(0)
    model = MSFlow(ModelConfig(backbone=backbone, image_size=image_size, pretrained=False)).eval()
    ref, run = ReferencePath(model), runner("torch", model, torch.device("cpu"))

    def nchw_input(x):
        layout, model.backbone.input_layout = model.backbone.input_layout, "contiguous"
        try:
            return run(x)
        finally:
            model.backbone.input_layout = layout

    def reference(x):  # numpy outputs too, so that both pay the same copies
        return tuple(t.float().cpu().numpy() for t in ref.predict(x))

    fns = {"torch": run, "torch NCHW input": nchw_input, "reference": reference}
    if onnx:
        fns["onnx"] = _onnx_runner(model)
    return fns


def _onnx_runner(model):
    """onnxruntime on the model's export, at torch's thread count when it is opened."""
    import tempfile

    import torch

    from msflow.infer.export import OnnxModel, export_onnx
    from msflow.infer.runtime import runner

    with tempfile.TemporaryDirectory(prefix="msflow-batch1-") as folder:
        path = export_onnx(model, Path(folder) / "model.onnx")
        session = OnnxModel(path, threads=torch.get_num_threads())
    return runner("onnx", session, torch.device("cpu"))


def measure(fns: dict, x, rounds: int, gap: float) -> dict:
    """{path: {wall_ms, cpu_ms: [per round]}}, interleaved rounds after a warm-up."""
    for fn in fns.values():
        fn(x)
    out = {k: {"wall_ms": [], "cpu_ms": []} for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(gap)
            cpu, wall = time.process_time(), time.perf_counter()
            fn(x)
            out[name]["wall_ms"].append(1000 * (time.perf_counter() - wall))
            out[name]["cpu_ms"].append(1000 * (time.process_time() - cpu))
    return out


def summary_lines(threads: int, batch: int, times: dict) -> list[str]:
    lines = []
    for name, t in times.items():
        wall, cpu = min(t["wall_ms"]), min(t["cpu_ms"])
        rate = (
            ""
            if batch == 1
            else f"  = {1000 * batch / wall:6.2f} img/s ({1000 * batch / cpu:6.2f} img/CPU-s)"
        )
        lines.append(
            f"  {threads} thr, batch {batch}, {name:<17} wall min {wall:8.1f} ms (median "
            f"{statistics.median(t['wall_ms']):8.1f}), CPU min {cpu:8.1f} ms{rate}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8, help="the throughput batch (default: 8)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: 15)")
    parser.add_argument(
        "--gap", type=float, default=0.1, help="quiet seconds before each call (default: 0.1)"
    )
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime, last in each round")
    parser.add_argument("--output", default=None, help="JSON file for every round's times")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    print(
        f"{args.backbone}, {args.image_size} px, random weights, {args.rounds} interleaved rounds: "
        "min of them"
    )
    results = []
    for n in args.threads:
        torch.set_num_threads(n)
        fns = paths(args.backbone, args.image_size, args.onnx)  # onnxruntime takes its threads when opened
        for x in (images[:1], images):
            times = measure(fns, x, args.rounds, args.gap)
            load = os.getloadavg()[0]
            print("\n".join(summary_lines(n, len(x), times)) + f"\n    (load average {load:.2f})")
            results.append({"threads": n, "batch": len(x), "load_average": load, "times": times})
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
