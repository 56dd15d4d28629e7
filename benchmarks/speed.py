"""Speed of msflow against the official code's way of running the same model, on one machine.

Run from a source checkout: ``msflow bench [--quick] ...`` or ``python -m benchmarks.speed ...``. This
harness is not part of the installed package; it times the product's own functions:

- **Training.** :meth:`msflow.train.features.FeatureCache.build` extracts (and standardises) the features
  of ``images`` PNG files once; :func:`msflow.train.loop.train_flows` then trains the flows from the cache
  (with ``--cpu-bf16`` also under bfloat16 autocast). One epoch over M and over 2M cached images gives
  the cost per image and the fixed cost per epoch (the loop's roll-back snapshots), extrapolated
  linearly to ``epochs`` (every epoch is identical work). The reference (``benchmarks/reference.py``)
  is the official schedule on the same weights, in float32; its loss is checked against ours.
- **Inference.** img/s at ``batch_size`` and batch-1 latency of ``MSFlow.predict`` (float32, and bf16
  with ``--cpu-bf16``), of :class:`msflow.infer.export.OnnxModel` on the model's ONNX export, and of
  the reference.
- **Memory.** Each phase runs in a fresh subprocess, so its peak resident set (``VmHWM``) is its own.
- **Ceiling.** float32 matmul GFLOP/s and the model's FLOPs per image (a multiply-add counts 2).
- **EfficientNet-Lite0 flows.** Flow-training img/s of the default backbone (``lite0_image_size`` px,
  ``batch_size``) on the plain path (NCHW, Adam's for-loop: torch's defaults) and on msflow's default
  path (channels-last on oneDNN CPUs, foreach Adam), with GFLOP/s and the share of the matmul ceiling
  (``benchmarks/train_profile.py``, which also profiles and tries the other levers).
- **AUPRO.** :func:`msflow.evaluate.metrics.aupro` against the official 800-threshold loop (no pool).
- **Time to accuracy** (with ``--accuracy-runs``). The training phase also times the held-out NLL that
  the plateau rule computes after every epoch; with finished run pairs on real data (``--stop plateau``
  vs the official ``--stop schedule --epochs 100``), :mod:`benchmarks.time_to_accuracy` combines these
  per-image costs with the epochs each run took into the end-to-end ratio, beside the accuracy deltas.

Timings on a shared machine are noisy: compare the ratios of one run, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from msflow.config import BackboneName, add_option_argument, option, option_fields
from msflow.errors import MSFlowError

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]  # the source checkout holding benchmarks/


@dataclass(frozen=True)
class SpeedSettings:
    """Everything one run of the harness depends on; ``msflow bench`` derives its flags from these."""

    backbone: BackboneName = option("wide_resnet50_2", "backbone to time")
    image_size: int = option(256, "input side in pixels")
    batch_size: int = option(8, "training and inference batch")
    images: int = option(64, "training images M")
    epochs: int = option(100, "epochs N of the extrapolated end-to-end schedule")
    measure_steps: int = option(2, "timed training steps per path (the reference's; ours times twice that)")
    inference_repeats: int = option(2, "timed rounds per runtime")
    threads: int | None = option(None, "torch/onnxruntime threads per phase (default: torch's)")
    aupro_maps: int = option(100, "maps of the AUPRO timing")
    aupro_size: int = option(512, "side of the AUPRO maps")
    aupro_loop_thresholds: int = option(40, "thresholds of the official loop timed, then extrapolated to 800")
    aupro_check_maps: int = option(10, "maps of the full-loop equality check")
    aupro_check_size: int = option(128, "side of the equality-check maps")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where to run")
    cpu_bf16: bool = option(False, "also time ours under CPU bfloat16 autocast")
    pretrained: bool = option(False, "ImageNet weights (random ones run at the same speed)")
    skip_onnx: bool = option(False, "do not time the ONNX export")
    skip_aupro: bool = option(False, "do not time AUPRO")
    lite0_image_size: int = option(256, "input side of the EfficientNet-Lite0 flow-training phase")
    lite0_steps: int = option(3, "training steps per timed epoch of the Lite0 phase (3 rounds per path)")
    skip_lite0: bool = option(False, "do not time the EfficientNet-Lite0 flow training")
    seed: int = option(0, "random weights, images and maps")
    accuracy_runs: tuple[str, ...] = option(
        (),
        "finished run folders in pairs OURS REFERENCE (--stop plateau vs --stop schedule --epochs 100, "
        "same data): the time-to-accuracy ratio and the accuracy check it relies on",
    )
    output: str = option("bench.json", "JSON file for the results")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is int and f.name != "seed" and value < 1:
                raise MSFlowError(f"bench: --{f.name.replace('_', '-')} must be >= 1, got {value}")
        if len(self.accuracy_runs) % 2:
            raise MSFlowError(
                "bench: --accuracy-runs takes run folders in pairs OURS REFERENCE, "
                f"got {len(self.accuracy_runs)}"
            )
        for run in self.accuracy_runs:
            if not (Path(run) / "metrics.json").is_file():
                raise MSFlowError(f"bench: '{run}' is not a finished run folder (no metrics.json)")
        if self.images < self.batch_size:
            raise MSFlowError(
                f"bench: --images ({self.images}) must be at least --batch-size ({self.batch_size})"
            )


# Tiny sizes for tests (``--quick``); explicit flags win.
QUICK = {
    **{"backbone": "resnet18", "image_size": 64, "batch_size": 4, "images": 8, "threads": 1},
    **{"aupro_maps": 4, "aupro_size": 64, "aupro_check_maps": 4, "aupro_check_size": 64},
    **{"lite0_image_size": 64, "lite0_steps": 1},
}
# The setting the performance targets were stated for, and the targets (ratios; memory in GB).
TARGET_SETTING = {
    "backbone": "wide_resnet50_2",
    "image_size": 256,
    "batch_size": 8,
    "images": 64,
    "epochs": 100,
}
TARGET_E2E, TARGET_INFERENCE, TARGET_PEAK_GB, TARGET_AUPRO = 5.0, 1.3, 6.0, 30.0


def _log(msg: str) -> None:
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


def _peaks(device) -> dict:
    import torch

    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _timed(fn, device=None) -> tuple[float, Any]:
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


def _setup(p: SpeedSettings, n: int):
    """(device, model, n images): the same random backbone and images in every phase."""
    import torch

    from msflow.config import ModelConfig
    from msflow.device import resolve_device
    from msflow.model.msflow import MSFlow

    device = resolve_device(p.device)
    torch.manual_seed(p.seed)
    cfg = ModelConfig(backbone=p.backbone, image_size=p.image_size, pretrained=p.pretrained)
    g = torch.Generator().manual_seed(p.seed + 1)
    images = torch.rand(n, 3, p.image_size, p.image_size, generator=g)
    return device, MSFlow(cfg).to(device).eval(), images.to(device)


def _extrapolate(
    seconds: float, images: int, p: SpeedSettings, extract: float = 0.0, per_epoch: float = 0.0
) -> dict:
    """One epoch of all images from a measured rate, and the linear extrapolation to ``epochs``."""
    epoch = seconds * p.images / images + per_epoch
    return {"epoch_seconds": epoch, "e2e_seconds": extract + p.epochs * epoch}


# --- Phases, each in its own subprocess ----------------------------------------------------------------
def _write_images(images, folder: Path) -> list:
    """Save (n, 3, S, S) tensors in [0, 1] as 8-bit PNG files; the cache reads them as a dataset would."""
    import numpy as np
    from PIL import Image

    from msflow.data.datasets import Sample

    samples = []
    for i, image in enumerate(images.cpu().numpy()):
        path = folder / f"{i:04d}.png"
        Image.fromarray(np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(path, compress_level=1)
        samples.append(Sample(path, 0, "good", None))
    return samples


def phase_train_ours(p: SpeedSettings, bf16: bool = False) -> dict:
    """FeatureCache.build on image files, then train_flows from the cache: the product's own functions."""

    from msflow.config import TrainConfig
    from msflow.train.features import FeatureCache
    from msflow.train.loop import TrainState, holdout_nll, make_optimizer, train_flows

    bs, n = p.batch_size, p.images
    device, model, images = _setup(p, n)
    with tempfile.TemporaryDirectory(prefix="msflow-bench-") as folder:
        samples = _write_images(images, Path(folder))
        FeatureCache.build(model, samples[:bs], device, bs, where="memory", progress=False)  # warm-up
        t_extract, cache = _timed(
            lambda: FeatureCache.build(model, samples, device, bs, where="memory", progress=False), device
        )
    _log(f"  ours: FeatureCache.build of {n} image files in {t_extract:.1f} s")
    optimizer = make_optimizer(model.trainable_parameters(), 1e-4, device)  # what msflow train runs
    # The official lr, clip and batch; no CUDA AMP (the reference has none); bf16 only when asked.
    cfg = TrainConfig(epochs=1, batch_size=bs, amp=False, seed=p.seed, cpu_bf16=bf16)

    def epoch_over(m: int):  # one epoch of train_flows over the first m cached images
        part = FeatureCache([a[:m] for a in cache.arrays])
        return train_flows(model, part, cfg, device, TrainState(), optimizer, progress=False)

    epoch_over(bs)  # warm-up: Adam state, kernels
    m = max(bs, min(p.measure_steps * bs, n // 2) // bs * bs)
    t_small, _ = _timed(lambda: epoch_over(m), device)
    t_large, state = _timed(lambda: epoch_over(2 * m), device)
    # t = fixed + m * per_image: two epoch lengths separate the per-image cost from the per-epoch cost
    # (train_flows snapshots the flows and optimizer at every epoch, its roll-back point).
    per_image = (t_large - t_small) / m if t_large > t_small else t_large / (2 * m)
    fixed = max(t_small - m * per_image, 0.0)
    _log(
        f"  ours: train_flows epochs of {m} and {2 * m} cached images in {t_small:.2f} s and {t_large:.2f} s"
    )
    # The plateau rule's extra cost: after every epoch, the NLL of the held-out images (a forward pass).
    holdout_nll(model, FeatureCache([a[:bs] for a in cache.arrays]), device)  # warm-up
    t_nll, _ = _timed(lambda: holdout_nll(model, cache, device), device)
    _log(f"  ours: held-out NLL of {n} cached images in {t_nll:.2f} s")
    return {
        **_extrapolate(per_image * p.images, p.images, p, extract=t_extract, per_epoch=fixed),
        "measured_seconds": t_extract + t_small + t_large,
        "extract_img_per_s": n / t_extract,
        "flow_train_img_per_s": 1.0 / per_image,
        "extract_seconds": t_extract,
        "extract_images": n,
        "train_seconds": t_small + t_large,
        "train_images": 3 * m,
        "train_steps": 3 * math.ceil(m / bs),
        "epoch_fixed_seconds": fixed,
        "holdout_nll_seconds_per_image": t_nll / n,
        "final_loss": state.history[-1]["loss"],
        **_peaks(device),
    }


def phase_train_reference(p: SpeedSettings) -> dict:
    """The official schedule (``benchmarks/reference.py``), timed over ``measure_steps`` steps."""
    import torch

    from benchmarks.reference import ReferencePath, check_loss, reference_step, unfrozen_backbone

    bs, n = p.batch_size, p.images
    device, model, images = _setup(p, n)
    ref = ReferencePath(model)
    check = check_loss(model, ref, images[: min(bs, 2)])
    _log(f"  loss check on {check['images']} images: relative difference {check['relative_difference']:.2e}")
    batches = list(torch.randperm(n, generator=torch.Generator().manual_seed(p.seed)).split(bs))
    timed = batches[: p.measure_steps]
    step = reference_step(model, ref, images)
    with unfrozen_backbone(model):
        step(batches[0])  # warm-up
        t_train, losses = _timed(lambda: [step(b) for b in timed], device)
    measured = sum(len(b) for b in timed)
    _log(f"  reference: {len(timed)} steps ({measured} images, backbone fwd+bwd) in {t_train:.1f} s")
    return {
        **_extrapolate(t_train, measured, p),
        "measured_seconds": t_train,
        "train_img_per_s": measured / t_train,
        "train_seconds": t_train,
        "train_images": measured,
        "train_steps": len(timed),
        "final_loss": losses[-1],
        "loss_check": check,
        **_peaks(device),
    }


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _onnx_session(model, out: dict):
    """Export ``model`` and open it with onnxruntime (notes in ``out``), or None."""
    import torch

    try:
        from msflow.infer.export import OnnxModel, export_onnx

        with tempfile.TemporaryDirectory(prefix="msflow-bench-") as folder:
            path = Path(folder) / "model.onnx"
            out["onnx_export_seconds"], _ = _timed(lambda: export_onnx(model, path))
            session = OnnxModel(path, threads=torch.get_num_threads())  # as msflow.infer.runtime opens it
            out["onnx_file_bytes"] = path.stat().st_size
        out["onnx_providers"] = list(session.providers)
        _log(f"  exported ONNX ({out['onnx_file_bytes'] / 1e6:.0f} MB) in {out['onnx_export_seconds']:.1f} s")
        return session
    except Exception as err:  # noqa: BLE001 - the ONNX part is optional
        out["onnx_note"] = f"skipped: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        _log(f"  ONNX {out['onnx_note']}")
        return None


# Names in this report -> msflow.infer.runtime's names (what --runtime takes).
RUNTIME_NAMES = {"torch": "torch", "torch_bf16": "torch-bf16", "onnx": "onnx"}


def _auto_pick(out: dict, device) -> dict:
    """What ``--runtime auto`` would choose from these measurements: the fastest runtime it considers on
    this machine whose outputs agree with float32 torch (msflow.infer.runtime's rule and tolerances)."""
    from msflow.infer import runtime as rt

    offered = rt.candidates(device)
    considered = [k for k, name in RUNTIME_NAMES.items() if out.get(k) and name in offered]
    rejected = {k: "disagrees with float32 torch" for k in considered if not out[f"{k}_agrees"]}
    speeds = {k: out[k]["img_per_s"] for k in considered}
    latency = {k: 1.0 / out[k]["latency_ms"] for k in considered}
    return {
        "considered": considered,
        "not_offered": [k for k, n in RUNTIME_NAMES.items() if n not in offered],
        "rejected": rejected,
        "batch": rt.fastest(speeds, rejected),
        "single": rt.fastest(latency, rejected),
    }


def phase_inference(p: SpeedSettings) -> dict:
    """Each runtime's img/s at ``batch_size`` and batch-1 latency, run by msflow.infer.runtime's runners
    (what ``msflow predict``/``serve`` run), next to the reference; FLOPs per image; the matmul ceiling."""
    import numpy as np
    import torch

    from benchmarks.reference import ReferencePath
    from msflow.infer import runtime as rt

    bs = p.batch_size
    device, model, batch = _setup(p, bs)
    ref, single = ReferencePath(model), batch[:1]
    runners = {"torch": rt.runner("torch", model, device)}
    expected = runners["torch"](batch)
    runners["torch"](single)
    # Ours alone so far: this phase's peak RSS up to here is our fp32 inference's own.
    out: dict[str, Any] = {"batch_size": bs, **_peaks(device), "onnx": None, "onnx_note": None}
    a = torch.randn(64, 64)
    with torch.inference_mode():
        flops = {
            "counts_multiply_add_as_2": _count_flops(lambda: a @ a) == 2 * 64**3,
            "ours_per_image": _count_flops(lambda: model.predict(single)),
            "backbone_per_image": _count_flops(lambda: model.extract(single)),
            "reference_per_image": _count_flops(lambda: ref.predict(single)),  # also a warm-up
        }

    def reference(x):  # its outputs as numpy too, so that both pay the same copies
        return tuple(t.float().cpu().numpy() for t in ref.predict(x))

    runners["reference"] = reference
    if p.cpu_bf16 or rt.native_bf16(device):  # what auto considers, and what --cpu-bf16 asks for
        runners["torch_bf16"] = rt.runner("torch-bf16", model, device)
    session = None if p.skip_onnx else _onnx_session(model, out)
    if p.skip_onnx:
        out["onnx_note"] = "skipped (--skip-onnx)"
    elif session is not None:
        runners["onnx"] = rt.runner("onnx", session, device)
    pixel_range = float(len(model.parallel_flows))
    for name, fn in list(runners.items())[1:]:  # warm-ups, which also compare the outputs with ours
        fn(single)
        got = fn(batch)
        out[f"{name}_max_score_difference"] = float(np.abs(got[0] - expected[0]).max())
        out[f"{name}_differences"] = rt.differences(expected, got, pixel_range)
        out[f"{name}_agrees"] = rt.agrees(out[f"{name}_differences"])
    out["torch_agrees"] = True
    # Interleaved rounds, so that load from other processes hits every runtime alike; medians.
    r = max(1, p.inference_repeats)
    times: dict[str, dict[str, list[float]]] = {k: {"batch": [], "single": []} for k in runners}
    for key, x, rounds in (("batch", batch, r), ("single", single, max(3, r))):
        for _ in range(rounds):
            for name, fn in runners.items():
                times[name][key].append(_timed(lambda fn=fn, x=x: fn(x), device)[0])
    for name, t in times.items():
        img_s, ms = bs / statistics.median(t["batch"]), 1000 * statistics.median(t["single"])
        out[name] = {
            "img_per_s": img_s,
            "latency_ms": ms,
            "batch_seconds": t["batch"],
            "single_seconds": t["single"],
        }
        _log(f"  {name}: {img_s:.2f} img/s at batch {bs}, {ms:.0f} ms at batch 1")
    for name in runners:
        out[f"{name}_speedup"] = out[name]["img_per_s"] / out["reference"]["img_per_s"]
        out[f"{name}_latency_speedup"] = out["reference"]["latency_ms"] / out[name]["latency_ms"]
    out["auto"] = _auto_pick(out, device)
    m = torch.randn(2048, 2048, device=device)  # the ceiling right after, under the same load
    m @ m
    gflops = max(10 * 2048**3 / _timed(lambda: [m @ m for _ in range(5)], device)[0] / GB for _ in range(3))
    out["ceiling"] = {
        "matmul_gflops": gflops,
        "counter_counts_multiply_add_as_2": flops["counts_multiply_add_as_2"],
        "gflop_per_image": flops["ours_per_image"] / GB,
        "backbone_gflop_per_image": flops["backbone_per_image"] / GB,
        "flows_and_maps_gflop_per_image": (flops["ours_per_image"] - flops["backbone_per_image"]) / GB,
        "reference_gflop_per_image": flops["reference_per_image"] / GB,
    }
    for name, key in (("torch", "ours"), ("onnx", "ours"), ("reference", "reference")):
        if name in runners:  # float32 runtimes only: the ceiling is a float32 matmul
            achieved = flops[f"{key}_per_image"] / GB * out[name]["img_per_s"]
            out["ceiling"][f"{name}_achieved_gflops"] = achieved
            out["ceiling"][f"{name}_fraction_of_ceiling"] = achieved / gflops
    out["peak_rss_bytes_all"] = peak_rss_bytes()
    return out


def phase_train_lite0(p: SpeedSettings) -> dict:
    """train_flows of EfficientNet-Lite0's flows from random cached features: plain vs default path."""
    import torch

    from benchmarks.train_profile import measure

    res = measure(
        ["plain", "default"],
        "efficientnet_lite0",
        p.lite0_image_size,
        p.batch_size,
        steps=p.lite0_steps,
        threads=torch.get_num_threads(),
    )
    for name, r in res["levers"].items():
        _log(f"  lite0 flows, {name} path: {r['img_per_s']:.2f} img/s, {r['gflops']:.1f} GFLOP/s")
    return {
        **res,
        "image_size": p.lite0_image_size,
        "batch_size": p.batch_size,
        **_peaks(torch.device("cpu")),
    }


PHASES = {
    "train_lite0": phase_train_lite0,
    "train_ours": phase_train_ours,
    "train_ours_bf16": lambda p: phase_train_ours(p, bf16=True),
    "train_reference": phase_train_reference,
    "inference": phase_inference,
}


def child_main(spec_path: str, result_path: str) -> None:
    """Entry point of a phase subprocess."""
    import torch

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    settings = SpeedSettings(**spec["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    result = {**PHASES[spec["phase"]](settings), "torch_threads": torch.get_num_threads()}
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


def run_phase(name: str, settings: SpeedSettings) -> dict:
    """Run one phase in a fresh interpreter (so its peak memory is its own); stderr streams through."""
    with tempfile.TemporaryDirectory(prefix="msflow-bench-") as folder:
        spec, result = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec.write_text(json.dumps({"phase": name, "settings": asdict(settings)}), encoding="utf-8")
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from benchmarks.speed import child_main; child_main(*sys.argv[1:])"
        )
        argv = [sys.executable, "-c", code, str(spec), str(result)]
        rc = subprocess.run(argv, stdout=subprocess.DEVNULL, check=False).returncode
        if rc != 0 or not result.is_file():
            raise MSFlowError(f"bench phase '{name}' failed (exit code {rc}); its error is above")
        return json.loads(result.read_text(encoding="utf-8"))


# --- AUPRO: vectorised vs the official 800-threshold loop ----------------------------------------------
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
    from benchmarks.reference import official_pro_loop
    from msflow.evaluate.metrics import aupro

    out: dict[str, Any] = {"maps": p.aupro_maps, "size": p.aupro_size}
    masks, maps = synthetic_maps(p.aupro_maps, p.aupro_size, seed=p.seed)
    for mode in ("standard", "official"):
        out[f"{mode}_seconds"], out[mode] = _timed(lambda mode=mode: aupro(masks, maps, mode=mode))
    _, loop_s, done, total = official_pro_loop(masks, maps, thresholds=p.aupro_loop_thresholds)
    out["loop_measured_seconds"], out["loop_seconds"] = loop_s, loop_s * total / done
    out["loop_thresholds_measured"], out["loop_thresholds_total"] = done, total
    out["loop_extrapolated"] = done < total
    out["speedup_standard"] = out["loop_seconds"] / out["standard_seconds"]
    out["speedup_official"] = out["loop_seconds"] / out["official_seconds"]
    _log(f"  aupro: standard {out['standard_seconds']:.2f} s, loop {loop_s:.1f} s for {done}/{total} thresh.")
    # Equality: the official mode against the complete loop, on a small case.
    cmasks, cmaps = synthetic_maps(p.aupro_check_maps, p.aupro_check_size, seed=p.seed + 7)
    loop, loop_s, _, _ = official_pro_loop(cmasks, cmaps)
    ours = aupro(cmasks, cmaps, mode="official")
    out["equality_check"] = {
        **{"maps": p.aupro_check_maps, "size": p.aupro_check_size, "official_mode": ours, "loop": loop},
        **{"abs_difference": abs(ours - loop), "loop_seconds": loop_s},
    }
    if not math.isclose(ours, loop, rel_tol=1e-9, abs_tol=1e-9):
        raise MSFlowError(f"bench: aupro(mode='official') = {ours!r} differs from the official loop {loop!r}")
    return out


# --- Verdicts and the printed report -------------------------------------------------------------------
def _targets(res: dict, p: SpeedSettings) -> list[dict]:
    """Each target as numbers: measured value, bound, and whether it holds (no parsing of display text)."""
    tr, inf, ap = res["training"], res["inference"], res["aupro"]
    rows = [("end-to-end training speed-up vs reference", tr["e2e_speedup"], ">=", TARGET_E2E, "x")]
    if "ours_bf16" in tr:
        rows.append(
            ("end-to-end training speed-up, bf16", tr["ours_bf16"]["e2e_speedup"], ">=", TARGET_E2E, "x")
        )
    rows.append(("torch inference img/s vs reference", inf["torch_speedup"], ">=", TARGET_INFERENCE, "x"))
    if inf["onnx"]:
        ratio = inf["onnx"]["img_per_s"] / inf["torch"]["img_per_s"]
        rows.append(("ONNX inference img/s vs torch", ratio, ">", 1.0, "x"))
    tta = res.get("time_to_accuracy")
    if tta:
        slowest = min(row["time_to_accuracy_speedup"] for row in tta["pairs"])
        rows.append(("time to accuracy vs reference (slowest pair)", slowest, ">=", TARGET_E2E, "x"))
        kept = sum(row["unchanged_accuracy"] for row in tta["pairs"])
        rows.append(("pairs with unchanged accuracy", kept, ">=", len(tta["pairs"]), ""))
    peak = res["memory"]["train_ours_peak_bytes"] / GB
    rows.append(("training peak memory (ours, RSS)", peak, "<=", TARGET_PEAK_GB, " GB"))
    if ap:
        rows.append(("AUPRO speed-up vs 800-threshold loop", ap["speedup_standard"], ">=", TARGET_AUPRO, "x"))
    at_target = all(getattr(p, k) == v for k, v in TARGET_SETTING.items()) and not p.pretrained
    holds = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b}
    return [
        {
            "name": name,
            "measured": value,
            "comparison": op,
            "bound": bound,
            "unit": unit,
            "pass": bool(holds[op](value, bound)),
            "at_target_setting": at_target,
        }
        for name, value, op, bound, unit in rows
    ]


def _row(label: str, *cells: str) -> str:
    return f"  {label:<42}" + " ".join(f"{c:>12}" for c in cells)


def _training_lines(tr: dict, p: dict) -> list[str]:
    o, r, n, ep = tr["ours"], tr["reference"], p["images"], p["epochs"]

    def rows(o: dict, indent: str = "") -> list[str]:
        table = [  # label, format, our key, the reference's key, ratio key
            ("training steps (img/s)", "{:.2f}", "flow_train_img_per_s", "train_img_per_s", "steps_speedup"),
            (f"one epoch of {n} images (s)", "{:.1f}", "epoch_seconds", "epoch_seconds", "per_epoch_speedup"),
            ("measured wall time (s)", "{:.1f}", "measured_seconds", "measured_seconds", None),
            (
                f"end-to-end, {ep} epochs (s, extrapolated)",
                "{:.0f}",
                "e2e_seconds",
                "e2e_seconds",
                "e2e_speedup",
            ),
        ]
        return [
            _row(indent + label, fmt.format(o[mine]), fmt.format(r[ref]), *([f"{o[x]:.2f}x"] if x else []))
            for label, fmt, mine, ref, x in table
        ]

    lc = tr["loss_check"]
    lines = [
        "Training" + _row("", "ours", "reference", "ratio")[8:],
        _row("feature extraction, once (img/s)", f"{o['extract_img_per_s']:.2f}", "-"),
        *rows(o),
        f"  measured: ours = FeatureCache.build of {n} image files ({o['extract_seconds']:.1f} s) + "
        f"train_flows epochs of {o['train_images'] // 3} and {2 * o['train_images'] // 3} images "
        f"({o['train_seconds']:.1f} s; {o['epoch_fixed_seconds']:.2f} s fixed per epoch);",
        f"            held-out NLL (the plateau rule's per-epoch check) "
        f"{1000 * o['holdout_nll_seconds_per_image']:.1f} ms per image;",
        f"            reference = {r['train_images']} images ({r['train_steps']} steps with backbone "
        f"fwd+bwd, {r['train_seconds']:.1f} s).",
        f"  extrapolated linearly to {ep} epochs (each epoch is identical work): ours = "
        f"{o['extract_seconds']:.1f} + {ep} x {o['epoch_seconds']:.2f} s, "
        f"reference = {ep} x {r['epoch_seconds']:.2f} s",
        f"  loss check, same batch and weights: fast {lc['fast']:.8g}, reference {lc['reference']:.8g}, "
        f"relative difference {lc['relative_difference']:.1e}",
    ]
    b = tr.get("ours_bf16")
    if b:
        lines += [
            "  ours with bfloat16 autocast of the flows (extraction and reference in float32):",
            *rows(b, "  "),
            f"    measured: {b['extract_seconds']:.1f} s extraction + {b['train_images']} images "
            f"({b['train_steps']} steps, {b['train_seconds']:.1f} s); "
            f"loss {b['final_loss']:.6g} (float32 {o['final_loss']:.6g})",
        ]
    return lines


def _time_to_accuracy_lines(tta: dict | None) -> list[str]:
    if not tta:
        return [
            "Time to accuracy: not measured in this run (it needs finished run pairs on real data:",
            "  --accuracy-runs OURS REFERENCE ..., --stop plateau vs --stop schedule --epochs 100)",
        ]
    from benchmarks.time_to_accuracy import format_lines

    return [
        *format_lines(tta),
        "  = this run's per-image costs (extraction, our epoch, the held-out NLL, the reference's epoch) at",
        "    the epochs each pair's runs took; accuracy is each pair's test metrics (ours - reference)",
    ]


def _inference_lines(inf: dict) -> list[str]:
    names = ["torch", "reference", "onnx"] + (["torch_bf16"] if "torch_bf16" in inf else [])

    def row(label: str, fmt: str, value) -> str:
        return _row(label, *(fmt.format(value(k)) if inf[k] else "-" for k in names))

    same = [
        f"{k.replace('_', ' ')} vs torch {inf[k + '_max_score_difference']:.1e}" for k in names[2:] if inf[k]
    ]
    lines = [
        "Inference" + _row("", *(k.replace("_", " ") for k in names))[9:],
        row(f"img/s at batch {inf['batch_size']}", "{:.2f}", lambda k: inf[k]["img_per_s"]),
        row("latency at batch 1 (ms)", "{:.0f}", lambda k: inf[k]["latency_ms"]),
        row("img/s vs reference", "{:.2f}x", lambda k: inf[f"{k}_speedup"]),
        row("latency vs reference", "{:.2f}x", lambda k: inf[f"{k}_latency_speedup"]),
        f"  same scores: reference vs torch max |difference| {inf['reference_max_score_difference']:.1e}"
        + "".join(f", {s}" for s in same),
    ]
    if inf["onnx_note"]:
        lines.append(f"  onnx: {inf['onnx_note']}")
    elif inf["onnx"]:
        lines.append(
            f"  onnx: export {inf['onnx_export_seconds']:.1f} s, file {inf['onnx_file_bytes'] / 1e6:.0f} MB"
        )
    from msflow.infer.runtime import MAP_TOLERANCE, SCORE_TOLERANCE

    checks = [
        f"{k.replace('_', ' ')} {'agrees' if inf[k + '_agrees'] else 'DISAGREES'} (score "
        f"{inf[k + '_differences']['score']:.1e}, maps {inf[k + '_differences']['pixel_map']:.1e} / "
        f"{inf[k + '_differences']['image_map']:.1e})"
        for k in names[2:]
        if inf[k]
    ]
    auto = inf["auto"]
    lines += [
        f"  check against float32 torch (tolerance: score {SCORE_TOLERANCE:g} of its scale, maps "
        f"{MAP_TOLERANCE:g} of their range): " + ("; ".join(checks) or "no other runtime"),
        f"  --runtime auto would pick: {auto['batch']} at batch {inf['batch_size']} (msflow predict), "
        f"{auto['single']} at batch 1 (msflow serve); considered {', '.join(auto['considered'])}"
        + "".join(f"; {k} rejected ({why})" for k, why in auto["rejected"].items())
        + "".join(f"; {k} not offered on this machine" for k in auto["not_offered"]),
    ]
    return lines


def _lite0_lines(lt: dict, ceiling: float) -> list[str]:
    plain, default = lt["levers"]["plain"], lt["levers"]["default"]
    lines = [
        f"Flow training of efficientnet_lite0 ({lt['image_size']} px, batch {lt['batch_size']}, "
        f"{lt['threads']} thread(s), random cached features; {lt['gflop_per_image']:.2f} GFLOP per image)",
        _row("", "img/s", "GFLOP/s", "of ceiling", "img/CPU-s"),
    ]
    for label, r in (
        ("plain path (NCHW, for-loop Adam)", plain),
        ("default path (channels-last, foreach Adam)", default),
    ):
        lines.append(
            _row(
                label,
                f"{r['img_per_s']:.2f}",
                f"{r['gflops']:.1f}",
                f"{100 * r['gflops'] / ceiling:.0f} %",
                f"{r['img_per_cpu_s']:.2f}",
            )
        )
    lines.append(
        f"  default vs plain: {default['speedup']:.2f}x (wall clock), "
        f"{default['speedup_cpu']:.2f}x (CPU time); vs the matmul below ({ceiling:.1f} GFLOP/s)"
    )
    return lines


def format_report(res: dict) -> str:
    from msflow.infer.runtime import describe_cpu

    p, tr, ce, mem, ap = (res[k] for k in ("config", "training", "ceiling", "memory", "aupro"))
    lines = [
        f"MSFlow bench: {p['backbone']} ({'ImageNet' if p['pretrained'] else 'random'} weights), "
        f"{p['image_size']} px, batch {p['batch_size']}, {p['images']} images, {p['epochs']} epochs, "
        f"{p['device_resolved']}, {p['torch_threads']} torch threads, fp32"
        + (" (+ bf16)" if p["cpu_bf16"] else ""),
        f"CPU: {describe_cpu(p['cpu'])}",
        f"other processes kept {p['busy_cores_before']:.1f} of {p['cpu_count']} cores busy before the start, "
        f"{p['busy_cores_during']:.1f} on average during the run",
        (
            f"GPU: {p['gpu']}"
            + ("" if p["device_resolved"] == "cuda" else " (not used: run with --device cuda)")
            if p.get("gpu")
            else "GPU: none available here (torch sees no CUDA device), so there are no GPU figures"
        ),
        "",
        *_training_lines(tr, p),
        "",
        *_time_to_accuracy_lines(res.get("time_to_accuracy")),
        "",
        *(
            _lite0_lines(res["lite0_flow_training"], ce["matmul_gflops"]) + [""]
            if res.get("lite0_flow_training")
            else []
        ),
        *_inference_lines(res["inference"]),
        "",
        "Physical ceiling",
        f"  float32 matmul 2048x2048: {ce['matmul_gflops']:.1f} GFLOP/s (the FLOP counter counts a "
        f"multiply-add as {'2' if ce['counter_counts_multiply_add_as_2'] else '1'} FLOPs)",
        f"  GFLOP per image: {ce['gflop_per_image']:.2f} in all = backbone "
        f"{ce['backbone_gflop_per_image']:.2f} (issue: 24.0 for WRN-50-2 layers 1-3 at 256 px)",
        f"    + flows and maps {ce['flows_and_maps_gflop_per_image']:.2f}; "
        f"reference {ce['reference_gflop_per_image']:.2f}",
        *(
            f"  {k:<9} inference: {ce[f'{k}_achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * ce[f'{k}_fraction_of_ceiling']:.0f} % of the matmul ceiling"
            for k in ("torch", "onnx", "reference")
            if f"{k}_achieved_gflops" in ce
        ),
        "",
        "Peak resident memory (each phase in a fresh process, includes Python + torch + model)",
        *(
            f"  {label:<21}{mem[key] / GB:6.2f} GB"
            for label, key in (
                ("training, ours", "train_ours_peak_bytes"),
                ("training, ours (bf16)", "train_ours_bf16_peak_bytes"),
                ("training, reference", "train_reference_peak_bytes"),
                ("inference (torch)", "inference_peak_bytes"),
            )
            if key in mem
        ),
    ]
    if ap:
        eq, done, total = ap["equality_check"], ap["loop_thresholds_measured"], ap["loop_thresholds_total"]
        how = f"{ap['loop_measured_seconds']:.1f} s for {done} of {total} thresholds, x{total / done:.0f}"
        lines += [
            "",
            f"AUPRO on {ap['maps']} maps of {ap['size']}x{ap['size']} (FPR <= 0.3)",
            f"  aupro(mode='standard')   {ap['standard_seconds']:8.2f} s   value {ap['standard']:.4f}",
            f"  aupro(mode='official')   {ap['official_seconds']:8.2f} s   value {ap['official']:.4f}",
            f"  official 800-threshold loop {ap['loop_seconds']:8.1f} s   "
            f"({how if ap['loop_extrapolated'] else 'all thresholds measured'})",
            f"  speed-up vs the loop: standard {ap['speedup_standard']:.0f}x, "
            f"official mode {ap['speedup_official']:.0f}x",
            f"  equality on {eq['maps']} maps of {eq['size']}x{eq['size']}, full loop: official mode "
            f"{eq['official_mode']!r} vs loop {eq['loop']!r} (difference {eq['abs_difference']:.1e})",
        ]
    setting = ", ".join(f"{k} {v}" for k, v in TARGET_SETTING.items())
    lines += ["", f"Targets (stated for {setting}, random weights)"]
    for t in res["targets"]:
        bound = f"{t['comparison']} {t['bound']:g}{t['unit']}"
        lines.append(
            f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:<44} {bound:<12} "
            f"measured {t['measured']:.2f}{t['unit']}"
        )
    if not all(t["at_target_setting"] for t in res["targets"]):
        lines.append("  (this run is not at the targets' setting, so these verdicts are indicative only)")
    return "\n".join(lines)


# --- Command line ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``msflow bench`` / ``python -m benchmarks.speed``: one flag per :class:`SpeedSettings` field."""
    parser = argparse.ArgumentParser(prog="msflow bench", description=__doc__.split("\n", 1)[0])
    for f, hint in option_fields(SpeedSettings):
        add_option_argument(parser, f, hint, dest=f.name)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes for tests: resnet18, 64 px, 8 images"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SpeedSettings:
    """Defaults (or ``--quick``'s tiny sizes), then every flag that was given."""
    base = replace(SpeedSettings(), **QUICK) if args.quick else SpeedSettings()
    given = {
        f.name: getattr(args, f.name) for f in fields(SpeedSettings) if getattr(args, f.name) is not None
    }
    return replace(base, **given)


def _cpu_counters() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    import psutil

    t, mine = psutil.cpu_times(), os.times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))  # guest is in user
    return time.monotonic(), busy, mine.user + mine.system + mine.children_user + mine.children_system


def _busy_cores(since: tuple[float, float, float] | None = None) -> float:
    """Cores kept busy by other processes: over a 1 s sample now, or on average since ``since``."""
    if since is None:
        since = _cpu_counters()
        time.sleep(1.0)
    now = _cpu_counters()
    others = max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / max(now[0] - since[0], 1e-9)
    return round(min(others, os.cpu_count() or 1), 2)


def _training_summary(ours: dict, ref: dict, bf16: dict | None) -> dict:
    for run in (ours, bf16):
        if run:
            run["steps_speedup"] = run["flow_train_img_per_s"] / ref["train_img_per_s"]
            run["per_epoch_speedup"] = ref["epoch_seconds"] / run["epoch_seconds"]
            run["e2e_speedup"] = ref["e2e_seconds"] / run["e2e_seconds"]
    tr = {"ours": ours, "reference": ref, "loss_check": ref["loss_check"]}
    tr.update(per_epoch_speedup=ours["per_epoch_speedup"], e2e_speedup=ours["e2e_speedup"])
    return {**tr, "ours_bf16": bf16} if bf16 else tr


def run_bench(p: SpeedSettings) -> dict:
    """Run every phase, print the table and write the JSON (``p.output``); returns the results."""
    import torch

    from msflow.device import resolve_device
    from msflow.infer.runtime import cpu_info

    p = replace(p, device=resolve_device(p.device).type)
    if p.device not in ("cpu", "cuda") or (p.cpu_bf16 and p.device != "cpu"):
        raise MSFlowError(f"bench: device '{p.device}' is not supported here (--cpu-bf16 needs the CPU)")
    busy, counters, start = _busy_cores(), _cpu_counters(), time.perf_counter()
    _log(
        f"msflow bench: {p.backbone}, {p.image_size} px, batch {p.batch_size}, {p.images} images "
        f"on {p.device}"
    )
    if busy >= 0.5:
        _log(f"warning: other processes keep {busy:.1f} cores busy: timings will be noisy (try --threads 1)")
    phases = [("train_ours", "training, ours: FeatureCache.build once + train_flows from the cache")]
    if p.cpu_bf16:
        phases.append(("train_ours_bf16", "training, ours (bf16): the flows under autocast"))
    if not p.skip_lite0:
        phases.append(("train_lite0", "training, efficientnet_lite0 flows: plain vs default path"))
    phases += [
        ("train_reference", "training, reference: backbone fwd+bwd every step, per-batch encodings"),
        ("inference", "inference: torch, reference, onnxruntime; FLOPs; matmul ceiling"),
    ]
    results = {}
    for i, (name, what) in enumerate(phases, 1):
        _log(f"[{i}/{len(phases) + 1}] {what}")
        results[name] = run_phase(name, p)
    ours, bf16, ref, inf, lite0 = (
        results.get(k)
        for k in ("train_ours", "train_ours_bf16", "train_reference", "inference", "train_lite0")
    )
    aupro_res = None
    if not p.skip_aupro:
        _log(f"[{len(phases) + 1}/{len(phases) + 1}] AUPRO: vectorised vs the official threshold loop")
        aupro_res = bench_aupro(p)
    memory = {"inference_with_reference_and_onnx_peak_bytes": inf["peak_rss_bytes_all"]}
    for key, run in results.items():
        memory[f"{key}_peak_bytes"] = run["peak_rss_bytes"]
        if "cuda_peak_bytes" in run:
            memory[f"{key}_cuda_peak_bytes"] = run["cuda_peak_bytes"]
    res: dict[str, Any] = {
        "config": {
            **asdict(p),
            "device_resolved": p.device,
            "torch_threads": inf["torch_threads"],
            "torch_version": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(),
            "cpu": cpu_info(),
            "busy_cores_before": busy,
            "busy_cores_during": _busy_cores(since=counters),
        },
        "training": _training_summary(ours, ref, bf16),
        "lite0_flow_training": lite0,
        "inference": inf,
        "memory": memory,
        "ceiling": inf.pop("ceiling"),
        "aupro": aupro_res,
        "notes": [
            "Timings share the machine with other processes; compare ratios of one run only.",
            "Adam (lr 1e-4), clipping at norm 2; the reference in float32, ours in float32 (and bf16).",
            "ours e2e = FeatureCache.build (decoding the image files included) + epochs x one train_flows "
            "epoch; reference e2e = epochs x steps on tensors already in memory (no decoding, no "
            "checkpointing, which the official code pays), which favours the reference.",
        ],
    }
    if lite0:
        for r in lite0["levers"].values():  # also against the ceiling of the inference phase
            r["fraction_of_bench_ceiling"] = r["gflops"] / res["ceiling"]["matmul_gflops"]
    if p.accuracy_runs:  # the epochs each stop rule needed on real data, and the accuracy it kept
        from benchmarks.time_to_accuracy import report as time_to_accuracy

        pairs = list(zip(p.accuracy_runs[::2], p.accuracy_runs[1::2], strict=True))
        res["time_to_accuracy"] = time_to_accuracy(res, pairs, reference_epochs=p.epochs)
    res["targets"] = _targets(res, p)
    res["seconds"] = time.perf_counter() - start
    print(format_report(res))
    print(f"\nbench took {res['seconds']:.0f} s; results in {p.output}")
    Path(p.output).parent.mkdir(parents=True, exist_ok=True)
    Path(p.output).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return res


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; errors the user can fix are one line, as in the ``msflow`` command."""
    args = build_parser().parse_args(argv)
    try:
        run_bench(settings_from_args(args))
    except MSFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
