"""Facts about the machine a speed run ran on, and the timing and memory helpers every phase shares.

The figures of ``msflow speed`` depend on the machine (vector width, int8 and bf16 matrix units, cores,
other processes' load), so every report starts with them: the CPU features, the thread counts, the
cores other processes kept busy, and per thread count the float32 matmul ceiling.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """Peak resident set of this process: ``VmHWM`` (exec resets it), else ``getrusage``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def peaks(device) -> dict:
    """This process's peak RSS (and the GPU's peak allocation when it ran on CUDA)."""
    import torch

    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def timed(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``; CUDA is synchronised so that its queued work counts."""
    import torch

    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by torch's counter (a multiply-add counts 2; checked in the report)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(device, side: int = 2048) -> float:
    """The float32 matmul ceiling at the current thread count: best of 3 rounds of 5 products."""
    import torch

    m = torch.randn(side, side, device=device)
    m @ m  # warm-up
    seconds = min(timed(lambda: [m @ m for _ in range(5)], device)[0] for _ in range(3))
    return 10 * side**3 / seconds / GB


def cpu_counters() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    import psutil

    t, mine = psutil.cpu_times(), os.times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))  # guest is in user
    return time.monotonic(), busy, mine.user + mine.system + mine.children_user + mine.children_system


def busy_cores(since: tuple[float, float, float] | None = None) -> float:
    """Cores kept busy by other processes: over a 1 s sample now, or on average since ``since``."""
    if since is None:
        since = cpu_counters()
        time.sleep(1.0)
    now = cpu_counters()
    others = max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / max(now[0] - since[0], 1e-9)
    return round(min(others, os.cpu_count() or 1), 2)


def machine_facts() -> dict[str, Any]:
    """CPU model and features, cores this process may use, torch's kernels and library versions."""
    import torch

    from msflow.infer.runtime import cpu_info

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_default_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": torch.backends.mkldnn.is_available(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_lines(p: dict, facts: dict, counts: list[int]) -> list[str]:
    """The report's head: the CPU, its features, the thread counts, the load, the GPU."""
    from msflow.infer.runtime import describe_cpu

    gpu = facts["gpu"]
    return [
        f"CPU: {describe_cpu(facts['cpu'])}",
        f"  torch kernels: {facts['torch_cpu_capability']}, oneDNN {'on' if facts['onednn'] else 'off'}; "
        f"{facts['usable_cores']} of {facts['cpu_count']} cores usable by this process, torch's default "
        f"{facts['torch_default_threads']} threads; timed at {', '.join(map(str, counts))} thread(s)",
        f"  torch {facts['torch_version']}, onnxruntime {facts['onnxruntime_version'] or 'not installed'}",
        f"other processes kept {p['busy_cores_before']:.1f} of {facts['cpu_count']} cores busy before the "
        f"start, {p['busy_cores_during']:.1f} on average during the run",
        (
            f"GPU: {gpu}" + ("" if p["device_resolved"] == "cuda" else " (not used: run with --device cuda)")
            if gpu
            else "GPU: none available here (torch sees no CUDA device), so there are no GPU figures"
        ),
    ]
