"""Running the harness: every phase in its own subprocess, at every thread count; the JSON and the report."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.speed.aupro import bench_aupro
from benchmarks.speed.inference import phase_inference
from benchmarks.speed.machine import busy_cores, cpu_counters, log, machine_facts
from benchmarks.speed.report import format_report, targets
from benchmarks.speed.settings import SpeedSettings
from benchmarks.speed.training import (
    phase_train_lite0,
    phase_train_ours,
    phase_train_reference,
    training_summary,
)
from msflow.errors import MSFlowError

ROOT = Path(__file__).resolve().parents[2]  # the source checkout holding benchmarks/

PHASES = {
    "train_lite0": phase_train_lite0,
    "train_ours": phase_train_ours,
    "train_ours_bf16": lambda p: phase_train_ours(p, bf16=True),
    "train_reference": phase_train_reference,
    "inference": phase_inference,
}


def child_main(spec_path: str, result_path: str) -> None:
    """Entry point of a phase subprocess: the phase at its thread count."""
    import torch

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    result = {
        **PHASES[spec["phase"]](SpeedSettings(**spec["settings"])),
        "torch_threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


def run_phase(name: str, settings: SpeedSettings, threads: int) -> dict:
    """Run one phase in a fresh interpreter (so its peak memory is its own); stderr streams through."""
    with tempfile.TemporaryDirectory(prefix="msflow-speed-") as folder:
        spec, result = Path(folder) / "spec.json", Path(folder) / "result.json"
        text = json.dumps({"phase": name, "settings": asdict(settings), "threads": threads})
        spec.write_text(text, encoding="utf-8")
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from benchmarks.speed.run import child_main; child_main(*sys.argv[1:])"
        )
        argv = [sys.executable, "-c", code, str(spec), str(result)]
        rc = subprocess.run(argv, stdout=subprocess.DEVNULL, check=False).returncode
        if rc != 0 or not result.is_file():
            raise MSFlowError(f"speed phase '{name}' failed (exit code {rc}); its error is above")
        return json.loads(result.read_text(encoding="utf-8"))


def phase_list(p: SpeedSettings) -> list[tuple[str, str]]:
    """(phase, what it times) of one thread count."""
    phases = [("train_ours", "training, ours: FeatureCache.build once + train_flows from the cache")]
    if p.cpu_bf16:
        phases.append(("train_ours_bf16", "training, ours (bf16): the flows under autocast"))
    if not p.skip_lite0:
        phases.append(("train_lite0", "training, efficientnet_lite0 flows: plain vs default path"))
    return phases + [
        ("train_reference", "training, reference: backbone fwd+bwd every step, per-batch encodings"),
        ("inference", "inference: every runtime and the reference; FLOPs; matmul ceiling"),
    ]


def run_thread_count(p: SpeedSettings, threads: int, step: list[int], total: int) -> dict:
    """Every phase at ``threads``: training, Lite0 flows, inference, ceiling and memory of that count."""
    results = {}
    for name, what in phase_list(p):
        step[0] += 1
        log(f"[{step[0]}/{total}] {threads} thread(s), {what}")
        results[name] = run_phase(name, p, threads)
    ours, bf16, ref, inf = (
        results.get(k) for k in ("train_ours", "train_ours_bf16", "train_reference", "inference")
    )
    memory = {"inference_with_reference_and_onnx_peak_bytes": inf["peak_rss_bytes_all"]}
    for key, run in results.items():
        memory[f"{key}_peak_bytes"] = run["peak_rss_bytes"]
        if "cuda_peak_bytes" in run:
            memory[f"{key}_cuda_peak_bytes"] = run["cuda_peak_bytes"]
    out = {
        "threads": inf["torch_threads"],
        "training": training_summary(ours, ref, bf16),
        "lite0_flow_training": results.get("train_lite0"),
        "inference": inf,
        "ceiling": inf.pop("ceiling"),
        "memory": memory,
    }
    if out["lite0_flow_training"]:  # also against the ceiling of the inference phase
        for r in out["lite0_flow_training"]["levers"].values():
            r["fraction_of_bench_ceiling"] = r["gflops"] / out["ceiling"]["matmul_gflops"]
    return out


def _finish(run: dict, p: SpeedSettings, config: dict, aupro: dict | None) -> None:
    """The time-to-accuracy line (from this thread count's costs) and the targets of one run."""
    if p.accuracy_runs:  # the epochs each stop rule needed on real data, and the accuracy it kept
        from benchmarks.time_to_accuracy import report as time_to_accuracy

        pairs = list(zip(p.accuracy_runs[::2], p.accuracy_runs[1::2], strict=True))
        run["time_to_accuracy"] = time_to_accuracy(run, pairs, reference_epochs=p.epochs)
    run["targets"] = targets(run, config, aupro)


NOTES = [
    "Timings share the machine with other processes; compare ratios of one run only.",
    "Adam (lr 1e-4), clipping at norm 2; the reference in float32, ours in float32 (and bf16).",
    "ours e2e = FeatureCache.build (decoding the image files included) + epochs x one train_flows "
    "epoch; reference e2e = epochs x steps on tensors already in memory (no decoding, no "
    "checkpointing, which the official code pays), which favours the reference.",
    "by_threads holds every thread count; the top-level tables are those of the first one.",
]


def run_bench(p: SpeedSettings) -> dict:
    """Run every phase at every thread count, print the report and write the JSON (``p.output``)."""
    from msflow.device import resolve_device

    p = replace(p, device=resolve_device(p.device).type)
    if p.device not in ("cpu", "cuda") or (p.cpu_bf16 and p.device != "cpu"):
        raise MSFlowError(f"speed: device '{p.device}' is not supported here (--cpu-bf16 needs the CPU)")
    busy, counters, start = busy_cores(), cpu_counters(), time.perf_counter()
    counts = p.thread_counts()
    log(
        f"msflow speed: {p.backbone}, {p.image_size} px, batch {p.batch_size}, {p.images} images "
        f"on {p.device}"
    )
    if busy >= 0.5:
        log(f"warning: other processes keep {busy:.1f} cores busy: timings will be noisy (try --threads 1)")
    step, total = [0], len(phase_list(p)) * len(counts) + (0 if p.skip_aupro else 1)
    runs = [run_thread_count(p, n, step, total) for n in counts]
    aupro = None
    if not p.skip_aupro:
        log(f"[{total}/{total}] AUPRO: vectorised vs the official threshold loop")
        aupro = bench_aupro(p)
    config: dict[str, Any] = {
        **asdict(p),
        "device_resolved": p.device,
        "threads": list(counts),
        **machine_facts(),
    }
    config.update(
        torch_threads=runs[0]["threads"], busy_cores_before=busy, busy_cores_during=busy_cores(counters)
    )
    for run in runs:
        _finish(run, p, config, aupro)
    res = {"config": config, **runs[0], "by_threads": runs, "aupro": aupro, "notes": NOTES}
    res["seconds"] = time.perf_counter() - start
    print(format_report(res))
    print(f"\nspeed took {res['seconds']:.0f} s; results in {p.output}")
    Path(p.output).parent.mkdir(parents=True, exist_ok=True)
    Path(p.output).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return res
