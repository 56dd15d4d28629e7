"""AUPRO: :func:`msflow.evaluate.metrics.aupro` against the official 800-threshold loop (no pool).

The loop is timed over ``aupro_loop_thresholds`` evenly spread thresholds and extrapolated to all of
them; on a small case it runs in full and must give the official mode's value.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.speed.machine import log, timed
from benchmarks.speed.settings import SpeedSettings
from msflow.errors import MSFlowError


def synthetic_maps(n: int, size: int, seed: int = 0):
    """(masks uint8 (n, s, s), maps float32 (n, s, s)): elliptic blob defects, smooth noisy maps."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        for _ in range(rng.integers(0, 4) if i else 1):  # image 0 always has a defect
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        noise = gaussian_filter(rng.standard_normal((size, size)), sigma=size / 128 + 1)
        signal = gaussian_filter(masks[i].astype(np.float64), sigma=size / 128 + 1)
        maps[i] = (noise / noise.std() + 2.0 * signal).astype(np.float32)
    return masks, maps


def bench_aupro(p: SpeedSettings) -> dict:
    """Seconds of both AUPRO modes and of the official loop on synthetic maps; the equality check."""
    from benchmarks.reference import official_pro_loop
    from msflow.evaluate.metrics import aupro

    out: dict[str, Any] = {"maps": p.aupro_maps, "size": p.aupro_size}
    masks, maps = synthetic_maps(p.aupro_maps, p.aupro_size, seed=p.seed)
    for mode in ("standard", "official"):
        out[f"{mode}_seconds"], out[mode] = timed(lambda mode=mode: aupro(masks, maps, mode=mode))
    _, loop_s, done, total = official_pro_loop(masks, maps, thresholds=p.aupro_loop_thresholds)
    out["loop_measured_seconds"], out["loop_seconds"] = loop_s, loop_s * total / done
    out["loop_thresholds_measured"], out["loop_thresholds_total"] = done, total
    out["loop_extrapolated"] = done < total
    out["speedup_standard"] = out["loop_seconds"] / out["standard_seconds"]
    out["speedup_official"] = out["loop_seconds"] / out["official_seconds"]
    log(f"  aupro: standard {out['standard_seconds']:.2f} s, loop {loop_s:.1f} s for {done}/{total} thresh.")
    # Equality: the official mode against the complete loop, on a small case.
    cmasks, cmaps = synthetic_maps(p.aupro_check_maps, p.aupro_check_size, seed=p.seed + 7)
    loop, loop_s, _, _ = official_pro_loop(cmasks, cmaps)
    ours = aupro(cmasks, cmaps, mode="official")
    out["equality_check"] = {
        **{"maps": p.aupro_check_maps, "size": p.aupro_check_size, "official_mode": ours, "loop": loop},
        **{"abs_difference": abs(ours - loop), "loop_seconds": loop_s},
    }
    if not math.isclose(ours, loop, rel_tol=1e-9, abs_tol=1e-9):
        raise MSFlowError(f"speed: aupro(mode='official') = {ours!r} differs from the official loop {loop!r}")
    return out
