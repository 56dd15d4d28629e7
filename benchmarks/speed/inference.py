"""The inference phase: every runtime msflow offers, side by side with the reference path.

img/s at ``batch_size`` and batch-1 latency of each runtime of :data:`RUNTIME_ROWS`, run by
:mod:`msflow.infer.runtime`'s own runners (what ``msflow predict``/``serve`` run), next to
``benchmarks/reference.py``; the outputs of each are checked against float32 torch with the tolerances
``--runtime auto`` uses; the model's FLOPs per image and the float32 matmul ceiling.

A runtime added to :mod:`msflow.infer.runtime` appears here with one line in :data:`RUNTIME_ROWS`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.speed.machine import GB, count_flops, log, matmul_gflops, peak_rss_bytes, peaks, timed
from benchmarks.speed.settings import SpeedSettings
from benchmarks.speed.training import setup


@dataclass(frozen=True)
class RuntimeRow:
    """One runtime of the inference table.

    key: its name in the report and the JSON; runtime: :mod:`msflow.infer.runtime`'s name (what
    ``--runtime`` takes). It is timed where ``--runtime auto`` considers it on this machine, or where
    ``asked`` says the user asked for it, unless ``skipped`` gives a reason. ``float32``: its FLOPs count
    against the float32 matmul ceiling.
    """

    key: str
    runtime: str
    float32: bool = True
    asked: Callable[[SpeedSettings], bool] = lambda p: False
    skipped: Callable[[SpeedSettings], str | None] = lambda p: None


RUNTIME_ROWS = (
    RuntimeRow("torch", "torch"),  # the first row: float32 torch, what every other runtime is checked against
    RuntimeRow("torch_bf16", "torch-bf16", float32=False, asked=lambda p: p.cpu_bf16),
    RuntimeRow("onnx", "onnx", skipped=lambda p: "skipped (--skip-onnx)" if p.skip_onnx else None),
)
REFERENCE = "reference"  # the official way of running the same model, the column every ratio is against


def _open_row(row: RuntimeRow, model, device, out: dict) -> Callable | None:
    """Open ``row``'s runtime as ``msflow predict`` does (exports in a temporary run folder); None and a
    note in ``out`` when it cannot run here."""
    from msflow.infer import runtime as rt

    try:
        with tempfile.TemporaryDirectory(prefix="msflow-speed-") as folder:
            sha = "speed-" + os.urandom(8).hex()  # matches no cached export
            seconds, (obj, _) = timed(
                lambda: rt.open_runtime(row.runtime, model, Path(folder), sha, device, False)
            )
            written = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            run = rt.runner(row.runtime, obj, device)
    except Exception as err:  # noqa: BLE001 - a runtime that cannot run here is reported, not fatal
        out[f"{row.key}_note"] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        log(f"  {row.key}: {out[row.key + '_note']}")
        return None
    if written:  # an export: what it cost
        out[f"{row.key}_open_seconds"], out[f"{row.key}_file_bytes"] = seconds, written
        log(f"  {row.key}: exported ({written / 1e6:.0f} MB) in {seconds:.1f} s")
    return run


def open_others(p: SpeedSettings, model, ref, device, out: dict) -> dict[str, Callable]:
    """The reference, then every row after float32 torch that is timed on this machine (notes in ``out``)."""
    from msflow.infer import runtime as rt

    def reference(x):  # its outputs as numpy too, so that both pay the same copies
        return tuple(t.float().cpu().numpy() for t in ref.predict(x))

    runners, offered = {REFERENCE: reference}, rt.candidates(device)
    for row in RUNTIME_ROWS[1:]:
        out[row.key], out[f"{row.key}_note"] = None, row.skipped(p)
        if out[f"{row.key}_note"] is None and row.runtime not in offered and not row.asked(p):
            out[f"{row.key}_note"] = "not offered on this machine"
        if out[f"{row.key}_note"] is None and (run := _open_row(row, model, device, out)) is not None:
            runners[row.key] = run
    return runners


def check_outputs(runners: dict, batch, single, pixel_range: float, out: dict) -> None:
    """Warm every runtime up, and compare its outputs with float32 torch's (msflow.infer.runtime's rule)."""
    import numpy as np

    from msflow.infer import runtime as rt

    torch_key = RUNTIME_ROWS[0].key
    expected = runners[torch_key](batch)
    runners[torch_key](single)
    for name, fn in runners.items():
        if name == torch_key:
            continue
        fn(single)
        got = fn(batch)
        out[f"{name}_max_score_difference"] = float(np.abs(got[0] - expected[0]).max())
        out[f"{name}_differences"] = rt.differences(expected, got, pixel_range)
        out[f"{name}_agrees"] = rt.agrees(out[f"{name}_differences"])
    out[f"{torch_key}_agrees"] = True


# onnxruntime's worker threads spin for ~20 ms after a run, waiting for the next one. Timed right after
# it, the next runtime shared its cores with them (at 2 threads on 2 cores torch's batch-1 latency rose
# about 2x), so every timed call starts after this quiet gap.
SETTLE_SECONDS = 0.1


def time_rounds(runners: dict, batch, single, repeats: int, device) -> dict[str, dict]:
    """Interleaved rounds (load from other processes hits every runtime alike); medians."""
    times: dict[str, dict[str, list[float]]] = {k: {"batch": [], "single": []} for k in runners}
    for key, x, rounds in (("batch", batch, repeats), ("single", single, max(3, repeats))):
        for _ in range(rounds):
            for name, fn in runners.items():
                time.sleep(SETTLE_SECONDS)
                times[name][key].append(timed(lambda fn=fn, x=x: fn(x), device)[0])
    res = {}
    for name, t in times.items():
        img_s, ms = len(batch) / statistics.median(t["batch"]), 1000 * statistics.median(t["single"])
        res[name] = {
            "img_per_s": img_s,
            "latency_ms": ms,
            "batch_seconds": t["batch"],
            "single_seconds": t["single"],
        }
        log(f"  {name}: {img_s:.2f} img/s at batch {len(batch)}, {ms:.0f} ms at batch 1")
    return res


def auto_pick(out: dict, device) -> dict:
    """What ``--runtime auto`` would choose from these measurements: the fastest runtime it considers on
    this machine whose outputs agree with float32 torch (msflow.infer.runtime's rule and tolerances)."""
    from msflow.infer import runtime as rt

    offered = rt.candidates(device)
    considered = [r.key for r in RUNTIME_ROWS if out.get(r.key) and r.runtime in offered]
    rejected = {k: "disagrees with float32 torch" for k in considered if not out[f"{k}_agrees"]}
    speeds = {k: out[k]["img_per_s"] for k in considered}
    latency = {k: 1.0 / out[k]["latency_ms"] for k in considered}
    return {
        "considered": considered,
        "not_offered": [r.key for r in RUNTIME_ROWS if r.runtime not in offered],
        "rejected": rejected,
        "batch": rt.fastest(speeds, rejected),
        "single": rt.fastest(latency, rejected),
    }


def _flops(model, ref, single) -> dict:
    import torch

    a = torch.randn(64, 64)
    with torch.inference_mode():
        return {
            "counts_multiply_add_as_2": count_flops(lambda: a @ a) == 2 * 64**3,
            "ours_per_image": count_flops(lambda: model.predict(single)),
            "backbone_per_image": count_flops(lambda: model.extract(single)),
            "reference_per_image": count_flops(lambda: ref.predict(single)),  # also a warm-up
        }


def ceiling(flops: dict, out: dict, device) -> dict:
    """The matmul ceiling right after the timings (under the same load), and each float32 runtime's share."""
    gflops = matmul_gflops(device)
    res = {
        "matmul_gflops": gflops,
        "counter_counts_multiply_add_as_2": flops["counts_multiply_add_as_2"],
        "gflop_per_image": flops["ours_per_image"] / GB,
        "backbone_gflop_per_image": flops["backbone_per_image"] / GB,
        "flows_and_maps_gflop_per_image": (flops["ours_per_image"] - flops["backbone_per_image"]) / GB,
        "reference_gflop_per_image": flops["reference_per_image"] / GB,
    }
    float32 = [(r.key, "ours") for r in RUNTIME_ROWS if r.float32] + [(REFERENCE, "reference")]
    for name, key in float32:  # the ceiling is a float32 matmul
        if out.get(name):
            achieved = flops[f"{key}_per_image"] / GB * out[name]["img_per_s"]
            res[f"{name}_achieved_gflops"], res[f"{name}_fraction_of_ceiling"] = achieved, achieved / gflops
    return res


def phase_inference(p: SpeedSettings) -> dict:
    """Each runtime's img/s at ``batch_size`` and batch-1 latency next to the reference; FLOPs per
    image; the matmul ceiling."""
    from benchmarks.reference import ReferencePath
    from msflow.infer import runtime as rt

    bs, torch_row = p.batch_size, RUNTIME_ROWS[0]
    device, model, batch = setup(p, bs)
    single = batch[:1]
    runners = {torch_row.key: rt.runner(torch_row.runtime, model, device)}
    runners[torch_row.key](batch)
    out: dict[str, Any] = {"batch_size": bs, **peaks(device)}  # float32 torch alone: its own peak
    ref = ReferencePath(model)
    flops = _flops(model, ref, single)
    runners.update(open_others(p, model, ref, device, out))
    check_outputs(runners, batch, single, float(len(model.parallel_flows)), out)
    out.update(time_rounds(runners, batch, single, max(1, p.inference_repeats), device))
    for name in runners:
        out[f"{name}_speedup"] = out[name]["img_per_s"] / out[REFERENCE]["img_per_s"]
        out[f"{name}_latency_speedup"] = out[REFERENCE]["latency_ms"] / out[name]["latency_ms"]
    out["auto"] = auto_pick(out, device)
    out["ceiling"] = ceiling(flops, out, device)
    out["peak_rss_bytes_all"] = peak_rss_bytes()
    return out
