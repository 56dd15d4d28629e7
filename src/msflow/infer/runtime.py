"""Which runtime runs a trained model's inference, how each one runs it, and ``auto``: the fastest one.

The runtimes compute the same :meth:`MSFlow.predict`: ``torch`` (float32, the reference), ``torch-bf16``
(bfloat16 autocast, offered to ``auto`` only where bf16 is native) and ``onnx`` (onnxruntime on the
model's export, :mod:`msflow.infer.export`). How ``auto`` measures and checks them, and where its
decision (``runtime.json``) and the export (``model.onnx``) are cached: docs/choices.md, "Runtimes".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from msflow._version import __version__
from msflow.config import RuntimeName
from msflow.errors import CheckpointError, MSFlowError
from msflow.files import atomic_write_bytes

log = logging.getLogger("msflow.runtime")

CHOICES = get_args(RuntimeName)  # "auto" and the runtimes
# Agreement with float32 torch on the synthetic batch. float32 ONNX Runtime differs by ~1e-6; bfloat16
# (8-bit mantissa, ~4e-3 per rounding) passes only where its errors do not pile up in the maps.
SCORE_TOLERANCE = 5e-3  # max |score - score_fp32| / max(1, max |score_fp32|)
MAP_TOLERANCE = 2e-2  # max |map - map_fp32| / the map's range ("add": number of scales, "mul": 1)
TIMED_ROUNDS = 2
DECISIONS_FILE = "runtime.json"
ONNX_FILE = "model.onnx"

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # scores (B,), "add" maps, "mul" maps (B, H, W)
Runner = Callable[[Tensor], Outputs]
Timer = Callable[[str, Callable[[], object]], float]  # (runtime, one batch) -> seconds


# --- running ------------------------------------------------------------------------------------------
def runner(runtime: str, model: Any, device: torch.device) -> Runner:
    """How ``runtime`` turns a (B, 3, H, W) batch in [0, 1] into numpy outputs (``model``: an MSFlow,
    or an :class:`~msflow.infer.export.OnnxModel` for ``onnx``)."""
    if runtime == "onnx":  # names were checked by select_runtime
        return lambda batch: model.predict(batch.cpu().numpy())
    bf16 = runtime == "torch-bf16"

    def run(batch: Tensor) -> Outputs:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.predict(batch.to(device))
        return tuple(t.float().cpu().numpy() for t in out)  # type: ignore[return-value]

    return run


# --- what this machine offers ---------------------------------------------------------------------------
def _cpu() -> tuple[str, set[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; elsewhere what platform says."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


# CPU flags that decide which runtime is fast: vector width, int8 dot products (VNNI), bf16/int8 matrix units.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """This machine's CPU for speed reports: model, logical cores, which of ``SPEED_FLAGS`` it has."""
    name, flags = _cpu()
    return {"model": name, "cores": os.cpu_count(), "features": {f: f in flags for f in SPEED_FLAGS}}


def describe_cpu(info: dict[str, Any]) -> str:
    """One line: ``model, N cores; has: ...; lacks: ...``."""
    features = info["features"]
    has = " ".join(f for f in features if features[f]) or "none of " + " ".join(SPEED_FLAGS)
    lacks = " ".join(f for f in features if not features[f])
    line = f"{info['model']}, {info['cores']} logical cores; has: {has}"
    return line + (f"; lacks: {lacks}" if lacks else "")


def native_bf16(device: torch.device) -> bool:
    """bfloat16 runs in hardware: CPU flags amx_bf16 or avx512_bf16, or a CUDA GPU that supports it."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & _cpu()[1])


def onnx_available(device: torch.device) -> bool:
    """onnxruntime imports and can run on ``device`` (a GPU needs its CUDA provider)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if device.type == "cuda":
        return "CUDAExecutionProvider" in ort.get_available_providers()
    return device.type == "cpu"


def candidates(device: torch.device) -> list[str]:
    """The runtimes ``auto`` considers on ``device``, float32 torch first."""
    offered = {"torch": True, "torch-bf16": native_bf16(device), "onnx": onnx_available(device)}
    return [name for name, available in offered.items() if available]


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{_cpu()[0]}:{os.cpu_count()} cpus"


# --- where files go --------------------------------------------------------------------------------------
def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msflow"


def writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed: permission bits lie to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".msflow-probe-")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def _folders(run_dir: Path, sha: str) -> list[tuple[Path, str]]:
    """Where cached files may live, best first: the run folder, then the user cache for this model."""
    return [(run_dir, "run folder"), (user_cache_dir() / sha[:16], "user cache")]


def open_runtime(
    runtime: str, model: Any, run_dir: Path, sha: str, device: torch.device, forced: bool = True
) -> tuple[Any, str]:
    """(the model object ``runtime`` runs, a note on where it came from). For ``onnx``: the export of
    this checkpoint, reused when its digest matches, else exported; ``forced`` (a runtime the user named)
    makes a broken or foreign ``model.onnx`` in the run folder an error rather than a reason to look on."""
    if runtime != "onnx":  # torch and torch-bf16 run the model itself
        return model, ""
    if not onnx_available(device):
        raise MSFlowError(f"runtime 'onnx' needs onnxruntime able to run on '{device.type}'")
    from msflow.infer.export import OnnxModel, export_onnx

    threads, stamp = torch.get_num_threads(), {"checkpoint_sha256": sha}
    paths = [(folder / ONNX_FILE, where) for folder, where in _folders(run_dir, sha)]
    for path, where in paths:
        if not path.is_file():
            continue
        users_own = forced and path.parent == run_dir
        try:
            onnx = OnnxModel(path, threads=threads)
        except CheckpointError:
            if users_own:
                raise
            continue
        if onnx.metadata.get("checkpoint_sha256") == sha:
            return onnx, f"{where} {path}"
        if users_own:  # the user's own export, of another checkpoint
            raise MSFlowError(f"'{path}' was not exported from this model; run 'msflow export' again")
    for path, where in paths:
        if not path.exists() and writable(path.parent):  # never replace a file the user exported
            export_onnx(model, path, metadata=stamp)
            return OnnxModel(path, threads=threads), f"exported to {where} {path}"
    with tempfile.TemporaryDirectory(prefix="msflow-onnx-") as tmp:  # onnxruntime keeps its own copy
        path = export_onnx(model, Path(tmp) / ONNX_FILE, metadata=stamp)
        return OnnxModel(path, threads=threads), "exported to a temporary file (no writable cache folder)"


# --- measuring --------------------------------------------------------------------------------------------
def synthetic_batch(size: tuple[int, int], batch_size: int, seed: int = 0) -> Tensor:
    """A seeded batch of smooth random images in [0, 1] (not white noise: closer to a photograph)."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    coarse = torch.rand(batch_size, 3, max(1, height // 16), max(1, width // 16), generator=g)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.randn(batch_size, 3, height, width, generator=g)).clamp(0, 1)


SPIN_GAP_SECONDS = 0.1


def wall_seconds(device: torch.device) -> Timer:
    """The default timer: wall seconds of one batch (CUDA synchronised so its queued work counts)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timer(_runtime: str, run_batch: Callable[[], object]) -> float:
        sync()
        # onnxruntime's worker threads keep spinning ~20 ms after a run; on a small CPU they would slow
        # whichever runtime is timed next (torch measured 87 ms after ONNX, 45 ms after a pause).
        time.sleep(SPIN_GAP_SECONDS)
        start = time.perf_counter()
        run_batch()
        sync()
        return time.perf_counter() - start

    return timer


def differences(reference: Outputs, outputs: Outputs, pixel_range: float) -> dict[str, float]:
    """Differences to float32 torch, each relative to its scale (see the tolerances above)."""
    names = ("score", "pixel_map", "image_map")
    if any(np.shape(ref) != np.shape(out) for ref, out in zip(reference, outputs, strict=True)):
        return dict.fromkeys(names, np.inf)
    scales = (max(1.0, float(np.abs(np.asarray(reference[0], dtype=np.float64)).max())), pixel_range, 1.0)
    found = {}
    for name, ref, out, scale in zip(names, reference, outputs, scales, strict=True):
        d = np.abs(np.asarray(out, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        found[name] = float(d.max() / scale) if np.isfinite(d).all() else float("inf")
    return found


def agrees(diff: dict[str, float]) -> bool:
    return diff["score"] <= SCORE_TOLERANCE and max(diff["pixel_map"], diff["image_map"]) <= MAP_TOLERANCE


@dataclass
class Decision:
    """What ``auto`` measured and chose (the content of one entry of ``runtime.json``)."""

    runtime: str
    img_per_s: dict[str, float]  # every runtime that ran, rejected ones included
    differences: dict[str, dict[str, float]]  # to float32 torch, relative (see agrees())
    rejected: dict[str, str]  # runtime -> why
    key: dict[str, Any]
    tolerance: dict[str, float] = field(
        default_factory=lambda: {"score": SCORE_TOLERANCE, "maps": MAP_TOLERANCE}
    )
    cached: bool = False  # read back from runtime.json rather than measured now
    where: str = ""  # where the decision is cached, and the chosen runtime's files

    def line(self) -> str:
        """The one log line: what was picked and why."""
        speeds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.img_per_s.items(), key=lambda kv: -kv[1]))
        rejected = "".join(f"; rejected {k}: {why}" for k, why in self.rejected.items())
        origin = "cached decision" if self.cached else "measured now"
        return (
            f"runtime auto -> {self.runtime} ({origin}: img/s at batch {self.key['batch_size']}, "
            f"{self.key['threads']} threads: {speeds}; outputs within tolerance of float32 torch"
            f"{rejected}){' ' + self.where if self.where else ''}"
        )


def measure(
    runners: dict[str, Runner], batch: Tensor, pixel_range: float, timer: Timer
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
    """(img/s, differences to float32 torch, rejections) of each runner; ``runners`` must hold "torch".
    Each runner's first batch is its warm-up and the check of its outputs; then every runner that ran
    (disagreeing ones too, for the record) is timed ``TIMED_ROUNDS`` times, interleaved so that other
    processes' load hits all of them alike, and its fastest batch is its speed."""
    reference = runners["torch"](batch)
    diffs, rejected = {}, {}
    for name, run in runners.items():
        if name == "torch":
            continue
        try:
            diffs[name] = differences(reference, run(batch), pixel_range)
        except Exception as err:  # noqa: BLE001 - a runtime that cannot run is one that is not chosen
            rejected[name] = f"failed: {_one_line(err)}"
            continue
        if not agrees(diffs[name]):
            worst = ", ".join(f"{k} {v:.1e}" for k, v in diffs[name].items())
            rejected[name] = f"disagrees with float32 torch ({worst})"
    best: dict[str, float] = {}
    for _ in range(TIMED_ROUNDS):
        for name in ["torch", *diffs]:
            seconds = timer(name, lambda run=runners[name]: run(batch))
            best[name] = min(best.get(name, float("inf")), seconds)
    return {k: len(batch) / max(s, 1e-12) for k, s in best.items()}, diffs, rejected


def _one_line(err: Exception) -> str:
    """An error as a short line of ``runtime.json``'s rejections."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def fastest(speeds: dict[str, float], rejected: dict[str, str]) -> str:
    """The runtime with the highest speed among those not rejected (float32 torch is never rejected)."""
    return max((k for k in speeds if k not in rejected), key=lambda k: speeds[k])


# --- the decision cache -------------------------------------------------------------------------------
def decision_key(sha: str, device: torch.device, batch_size: int, names: list[str]) -> dict[str, Any]:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "model_sha256": sha,
        "machine": _machine(device),
        "threads": torch.get_num_threads(),
        "batch_size": int(batch_size),
        "candidates": list(names),
        "msflow": __version__,
        "torch": torch.__version__,
        "onnxruntime": ort_version,
    }


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_decisions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["decisions"] if isinstance(data.get("decisions"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}  # absent or unreadable: measure again


def cached_decision(run_dir: Path, key: dict[str, Any]) -> Decision | None:
    for folder, where in _folders(run_dir, key["model_sha256"]):
        entry = _read_decisions(folder / DECISIONS_FILE).get(_key_id(key))
        if isinstance(entry, dict) and entry.get("key") == key:
            try:
                note = f"(from {where} {folder / DECISIONS_FILE})"
                return Decision(**{**entry, "cached": True, "where": note})
            except TypeError:
                return None
    return None


def save_decision(run_dir: Path, decision: Decision) -> str:
    """Add ``decision`` to the first writable ``runtime.json``; returns where (or why nowhere)."""
    entry = {k: v for k, v in asdict(decision).items() if k not in ("cached", "where")}
    for folder, where in _folders(run_dir, decision.key["model_sha256"]):
        if not writable(folder):
            continue
        path = folder / DECISIONS_FILE
        decisions = _read_decisions(path)
        decisions[_key_id(decision.key)] = entry
        try:
            atomic_write_bytes(path, json.dumps({"decisions": decisions}, indent=2).encode("utf-8"))
        except OSError:
            continue
        return f"(saved in {where} {path})"
    return "(not saved: neither the run folder nor the user cache is writable)"


# --- the entry point --------------------------------------------------------------------------------
def select_runtime(
    runtime: str, model: Any, run_dir: Path, sha: str, device: torch.device, batch_size: int = 1
) -> tuple[str, Any, Decision | None]:
    """Resolve ``runtime`` (``auto`` or a runtime's name) for ``model``, whose checkpoint digest is
    ``sha``: (name, model object to run, the decision when ``auto``). A named runtime is honoured as
    asked, without measuring."""
    if runtime not in CHOICES:
        raise MSFlowError(f"runtime must be one of {', '.join(CHOICES)}, got '{runtime}'")
    if batch_size < 1:
        raise MSFlowError(f"batch size must be >= 1, got {batch_size}")
    decision, opened = None, {}
    if runtime == "auto":
        key = decision_key(sha, device, batch_size, candidates(device))
        decision = cached_decision(run_dir, key) or _decide(key, model, run_dir, device, opened)
        log.info(decision.line())
        runtime = decision.runtime
    elif runtime == "torch-bf16" and not native_bf16(device):
        log.warning("runtime torch-bf16 on %s without native bfloat16: slower than fp32", device)
    if runtime not in opened:
        opened[runtime], where = open_runtime(runtime, model, run_dir, sha, device, forced=decision is None)
        if where:
            log.info("runtime %s: %s", runtime, where)
    return runtime, opened[runtime], decision


def _decide(key: dict[str, Any], model: Any, run_dir: Path, device: torch.device, opened: dict) -> Decision:
    """Measure every candidate of ``key`` now and save the decision; the runtimes opened go to ``opened``."""
    sha, runners, rejected, notes = key["model_sha256"], {}, {}, []
    for name in key["candidates"]:
        try:
            opened[name], note = open_runtime(name, model, run_dir, sha, device, forced=False)
        except Exception as err:  # noqa: BLE001 - e.g. an export that fails: then not a candidate
            rejected[name] = f"unavailable: {_one_line(err)}"
            continue
        runners[name] = runner(name, opened[name], device)
        notes += [f"{name}: {note}"] if note else []
    batch = synthetic_batch(model.anomaly.image_size, key["batch_size"])
    pixel_range = float(len(model.parallel_flows))
    speeds, diffs, failed = measure(runners, batch, pixel_range, wall_seconds(device))
    rejected.update(failed)
    decision = Decision(fastest(speeds, rejected), speeds, diffs, rejected, key)
    decision.where = " ".join([save_decision(run_dir, decision), *notes])
    return decision
