"""``runtime="auto"`` and the forced runtimes (msflow.infer.runtime), on a tiny untrained run folder.

The timer is a seam: speeds are injected, never measured, so no assertion depends on this machine's load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_fixtures import build_run

from msflow.errors import MSFlowError
from msflow.infer import runtime as rt
from msflow.infer.export import OnnxModel
from msflow.infer.predictor import Predictor


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # never the real ~/.cache
    monkeypatch.setattr(rt, "candidates", lambda device: ["torch", "onnx"])  # whatever the CPU offers
    return build_run(tmp_path)


class FakeTimer:
    """Seconds per batch for each runtime, as if measured; counts the timed batches."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.calls = seconds, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeTimer:
        monkeypatch.setattr(rt, "wall_seconds", lambda device: self)
        return self

    def __call__(self, name: str, run_batch) -> float:
        self.calls += 1
        return self.seconds[name]


@pytest.mark.parametrize("fastest", ["torch", "onnx"])
def test_auto_picks_the_measured_fastest(run: Path, monkeypatch: pytest.MonkeyPatch, fastest: str) -> None:
    other = {"torch": "onnx", "onnx": "torch"}[fastest]
    timer = FakeTimer({fastest: 0.1, other: 0.3}).install(monkeypatch)
    predictor = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert predictor.runtime == fastest
    assert isinstance(predictor.model, OnnxModel) == (fastest == "onnx")
    decision = predictor.runtime_decision
    assert decision.img_per_s == pytest.approx({fastest: 2 / 0.1, other: 2 / 0.3})
    assert decision.rejected == {} and not decision.cached
    assert timer.calls == 2 * rt.TIMED_ROUNDS
    # Both agreed with float32 torch on the synthetic batch, and the record says by how much.
    assert rt.agrees(decision.differences["onnx"])
    assert decision.differences["onnx"]["score"] < 1e-4
    # The export is cached beside the model, tied to this checkpoint.
    onnx = OnnxModel(run / "model.onnx")
    assert onnx.metadata["checkpoint_sha256"] == predictor.meta["sha256"]
    saved = json.loads((run / "runtime.json").read_text())["decisions"]
    (entry,) = saved.values()
    assert entry["runtime"] == fastest and entry["key"]["batch_size"] == 2


def test_a_runtime_that_disagrees_is_rejected_even_when_faster(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rt.runner

    def skewed(name, model, device):
        run_batch = real(name, model, device)
        if name != "onnx":
            return run_batch
        return lambda batch: (lambda out: (out[0] + 0.1, out[1], out[2]))(run_batch(batch))

    monkeypatch.setattr(rt, "runner", skewed)
    FakeTimer({"torch": 0.3, "onnx": 0.1}).install(monkeypatch)
    predictor = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert predictor.runtime == "torch"
    decision = predictor.runtime_decision
    assert "disagrees with float32 torch" in decision.rejected["onnx"]
    assert decision.differences["onnx"]["score"] > rt.SCORE_TOLERANCE
    assert not rt.agrees(decision.differences["onnx"])


def test_the_decision_is_cached_and_invalidated(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = FakeTimer({"torch": 0.1, "onnx": 0.3}).install(monkeypatch)
    Predictor.load(run, "cpu", "auto", batch_size=2)
    measured = timer.calls
    assert measured > 0
    again = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert timer.calls == measured and again.runtime_decision.cached  # nothing re-measured
    assert again.runtime == "torch"
    Predictor.load(run, "cpu", "auto", batch_size=3)  # another batch size: measured again
    assert timer.calls == 2 * measured
    previous = torch.get_num_threads()
    torch.set_num_threads(previous + 1)  # another thread count
    try:
        Predictor.load(run, "cpu", "auto", batch_size=2)
    finally:
        torch.set_num_threads(previous)
    assert timer.calls == 3 * measured
    monkeypatch.setattr(rt, "_machine", lambda device: "another machine")
    Predictor.load(run, "cpu", "auto", batch_size=2)
    assert timer.calls == 4 * measured
    decisions = json.loads((run / "runtime.json").read_text())["decisions"]
    assert len(decisions) == 4  # one entry per key, the first ones kept


def test_a_new_checkpoint_invalidates_the_decision_and_the_export(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timer = FakeTimer({"torch": 0.3, "onnx": 0.1}).install(monkeypatch)
    first = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert first.runtime == "onnx"
    from msflow.model.checkpoint import load_model, save_model

    model, cfg, meta = load_model(run)
    with torch.no_grad():
        model.fusion_flow.subnet_u_to_v.tau_heads[0].bias.add_(0.5)
    kept = {k: meta[k] for k in ("threshold", "metrics", "dataset")}
    save_model(model, cfg, run / "model", **kept)  # as if retrained
    calls = timer.calls
    second = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert timer.calls > calls and not second.runtime_decision.cached
    assert second.meta["sha256"] != first.meta["sha256"]
    # The run folder's model.onnx belongs to the old checkpoint, so it is left alone and the new
    # export goes to the user cache.
    assert OnnxModel(run / "model.onnx").metadata["checkpoint_sha256"] == first.meta["sha256"]
    assert second.model.metadata["checkpoint_sha256"] == second.meta["sha256"]
    assert Path(second.model.path).is_relative_to(rt.user_cache_dir())


def test_forced_runtimes_are_honoured_without_measuring(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = FakeTimer({"torch": 9.0, "onnx": 9.0, "torch-bf16": 9.0}).install(monkeypatch)
    images = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    results = {}
    for name in ("torch", "onnx", "torch-bf16"):
        predictor = Predictor.load(run, "cpu", name)
        assert predictor.runtime == name and predictor.runtime_decision is None
        results[name] = predictor.predict_images(images)[0]
    assert timer.calls == 0 and not (run / "runtime.json").exists()
    assert (run / "model.onnx").is_file()  # forced onnx exports what it needs
    assert results["onnx"].score == pytest.approx(results["torch"].score, abs=1e-5)
    assert results["torch-bf16"].score == pytest.approx(results["torch"].score, rel=0.02)
    with pytest.raises(MSFlowError, match="runtime must be one of"):
        Predictor.load(run, "cpu", "tensorrt")


def test_a_read_only_run_folder_uses_the_user_cache_then_a_temporary_file(
    run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tests run as root, for whom permission bits do not stop a write: the probe is the seam.
    monkeypatch.setattr(rt, "writable", lambda folder: folder != run)
    timer = FakeTimer({"torch": 0.3, "onnx": 0.1}).install(monkeypatch)
    with caplog.at_level("INFO", logger="msflow.runtime"):
        predictor = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert predictor.runtime == "onnx"
    assert not (run / "model.onnx").exists() and not (run / "runtime.json").exists()
    cache = rt.user_cache_dir() / predictor.meta["sha256"][:16]
    assert (cache / "model.onnx").is_file() and (cache / "runtime.json").is_file()
    line = [r.message for r in caplog.records if "runtime auto -> onnx" in r.message]
    assert len(line) == 1 and "user cache" in line[0] and "img/s" in line[0]
    calls = timer.calls
    assert Predictor.load(run, "cpu", "auto", batch_size=2).runtime_decision.cached
    assert timer.calls == calls

    monkeypatch.setattr(rt, "writable", lambda folder: False)  # nothing writable at all
    monkeypatch.setenv("XDG_CACHE_HOME", str(run.parent / "another-cache"))
    caplog.clear()
    with caplog.at_level("INFO", logger="msflow.runtime"):
        predictor = Predictor.load(run, "cpu", "auto", batch_size=2)
    assert predictor.runtime == "onnx" and not predictor.runtime_decision.cached
    text = " ".join(r.message for r in caplog.records)
    assert "temporary file" in text and "not saved" in text
    assert predictor.predict_images([np.zeros((64, 64, 3), np.uint8)])[0].score >= 0


def test_bf16_is_offered_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(rt, "_cpu", lambda: ("an AVX2 CPU", {"avx2", "fma"}))
    assert not rt.native_bf16(cpu) and "torch-bf16" not in rt.candidates(cpu)
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(rt, "_cpu", lambda flag=flag: ("a newer CPU", {"avx2", flag}))
        assert rt.native_bf16(cpu) and "torch-bf16" in rt.candidates(cpu)
    assert rt.candidates(cpu)[0] == "torch"


def test_differences_are_relative_to_each_output_scale() -> None:
    ref = (np.array([0.5, 200.0]), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    same = rt.differences(ref, ref, pixel_range=3.0)
    assert rt.agrees(same) and same == {"score": 0.0, "pixel_map": 0.0, "image_map": 0.0}
    # Scores are compared relative to the largest score (200 here), the "add" map to its range (3).
    near = (ref[0] + 0.1, ref[1] + 0.02, ref[2])
    expected = {"score": 5e-4, "pixel_map": 0.02 / 3, "image_map": 0}
    assert rt.differences(ref, near, 3.0) == pytest.approx(expected)
    assert rt.agrees(rt.differences(ref, near, 3.0))
    assert not rt.agrees(rt.differences(ref, (ref[0], ref[1], ref[2] + 0.05), 3.0))
    assert not rt.agrees(rt.differences(ref, (ref[0] * np.nan, ref[1], ref[2]), 3.0))


def test_cpu_description_names_what_it_has_and_lacks() -> None:
    from msflow.infer.runtime import SPEED_FLAGS, cpu_info, describe_cpu

    info = {"model": "Xeon X", "cores": 2, "features": {f: f in ("avx2", "amx_int8") for f in SPEED_FLAGS}}
    line = describe_cpu(info)
    assert line.startswith("Xeon X, 2 logical cores; has: avx2 amx_int8; lacks: fma avx512f")
    assert describe_cpu({**info, "features": dict.fromkeys(SPEED_FLAGS, True)}).endswith("amx_int8")
    assert set(cpu_info()["features"]) == set(SPEED_FLAGS)


def test_the_default_timer_pauses_before_timing_so_spinning_threads_do_not_count(monkeypatch) -> None:
    """onnxruntime's threads spin after a run; the timer sleeps first, and the sleep is not timed."""
    import time as _time

    events: list[str] = []
    monkeypatch.setattr(rt.time, "sleep", lambda s: events.append(f"sleep {s}"))
    real = _time.perf_counter
    monkeypatch.setattr(rt.time, "perf_counter", lambda: (events.append("clock"), real())[1])
    seconds = rt.wall_seconds(torch.device("cpu"))("onnx", lambda: events.append("run"))
    assert events == [f"sleep {rt.SPIN_GAP_SECONDS}", "clock", "run", "clock"]
    assert rt.SPIN_GAP_SECONDS >= 0.05 and seconds >= 0
