"""Tests for the speed harness (benchmarks/): the official-style reference is exact, the command runs.

The harness lives in the source checkout, beside tests/, not in the installed package.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks" / "speed" / "__init__.py").is_file():
    pytest.skip("no benchmarks/ folder (not a source checkout)", allow_module_level=True)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.reference import (  # noqa: E402 - needs the checkout on sys.path
    ReferencePath,
    official_pro_loop,
    one_hot_permutation,
    reference_block_forward,
)
from benchmarks.speed.aupro import synthetic_maps  # noqa: E402
from benchmarks.speed.settings import SpeedSettings  # noqa: E402
from msflow import (  # noqa: E402
    ModelConfig,
    MSFlow,
    cli,  # noqa: E402
)
from msflow.cli import main  # noqa: E402
from msflow.errors import MSFlowError  # noqa: E402
from msflow.evaluate.metrics import aupro  # noqa: E402
from msflow.infer.runtime import SPEED_FLAGS  # noqa: E402
from msflow.model.coupling import AffineCouplingBlock  # noqa: E402
from msflow.model.parallel_flow import positional_encoding_2d  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead (and stalls on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init so that scales, shifts and the global affine all matter."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("clamp", ["freia02", "freia_new"])
@pytest.mark.parametrize("channels", [6, 7])
def test_reference_block_equals_fast_block(float64, clamp: str, channels: int) -> None:
    block = AffineCouplingBlock(
        channels, cond_channels=8, clamp=clamp, generator=torch.Generator().manual_seed(1)
    )
    _perturb(block)
    x = torch.randn(3, channels, 5, 4)
    cond = positional_encoding_2d(8, 5, 4)[None]
    fast_y, fast_ld = block(x, cond)  # split first conv, (1, D, H, W) condition, index permutation
    # Official way: the condition repeated over the batch, full first conv, one-hot 1x1 permutation.
    ref_y, ref_ld = reference_block_forward(block, x, cond.repeat(3, 1, 1, 1))
    assert ref_y.dtype == torch.float64
    torch.testing.assert_close(ref_y, fast_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref_ld, fast_ld, rtol=1e-10, atol=1e-10)


def test_one_hot_permutation_matches_indexing(float64) -> None:
    perm = torch.randperm(9)
    x = torch.randn(2, 9, 3, 3)
    y = torch.nn.functional.conv2d(x, one_hot_permutation(perm))
    assert torch.equal(y, x[:, perm])


def test_reference_path_equals_model_flow(float64, one_thread) -> None:
    model = MSFlow(ModelConfig(backbone="resnet18", image_size=64, pretrained=False)).eval()
    _perturb(model, scale=0.01)
    images = torch.rand(2, 3, 64, 64)
    ref = ReferencePath(model)
    with torch.no_grad():
        feats = model.standardize(model.extract(images))
        fast = model.flow(feats)
        slow = ref.flow(ref.features(images))
        fast_maps, slow_maps = model.predict(images), ref.predict(images)
    for a, b in zip(slow.zs, fast.zs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slow.log_det, fast.log_det, rtol=1e-10, atol=1e-10)
    for a, b in zip(slow_maps, fast_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_official_loop_equals_official_mode() -> None:
    masks, maps = synthetic_maps(3, 48, seed=5)
    loop, seconds, done, total = official_pro_loop(masks, maps)
    assert done == total >= 800 and seconds > 0
    assert loop == pytest.approx(aupro(masks, maps, mode="official"), rel=1e-9, abs=1e-9)
    value, _, done, _ = official_pro_loop(masks, maps, thresholds=40)
    assert value is None and done == 40  # a timed subset gives no curve


def _positive_numbers(d: dict, keys: list[str]) -> None:
    for key in keys:
        assert isinstance(d[key], (int, float)) and np.isfinite(d[key]) and d[key] > 0, (key, d[key])


def test_bench_quick_writes_json(tmp_path, capsys) -> None:
    from test_time_to_accuracy import make_run

    from benchmarks.time_to_accuracy import ratio

    # Two finished-run pairs (the defaults vs the official length): one within the tolerances, one not.
    ours = make_run(tmp_path / "ours", "mtd", 40, "plateau", 97.0, 80.0)
    same = make_run(tmp_path / "same", "mtd", 100, "schedule", 97.2, 80.3)
    better = make_run(tmp_path / "better", "mtd", 100, "schedule", 97.5, 80.0)
    out = tmp_path / "bench.json"
    runs = [str(ours), str(same), str(ours), str(better)]
    assert main(["speed", "--quick", "--skip-onnx", "--output", str(out), "--accuracy-runs", *runs]) == 0
    printed = capsys.readouterr().out
    assert "Training" in printed and "Targets (stated for" in printed and "FeatureCache.build" in printed
    res = json.loads(out.read_text())
    assert res["config"]["backbone"] == "resnet18" and res["config"]["image_size"] == 64
    cpu = res["config"]["cpu"]  # the machine's model and the flags that decide which runtime is fast
    assert set(cpu["features"]) == set(SPEED_FLAGS) and cpu["cores"] == os.cpu_count()
    assert f"CPU: {cpu['model']}, {cpu['cores']} logical cores; has: " in printed
    tr = res["training"]
    _positive_numbers(
        tr["ours"],
        ["extract_img_per_s", "flow_train_img_per_s", "epoch_seconds", "e2e_seconds", "measured_seconds"],
    )
    _positive_numbers(
        tr["reference"], ["train_img_per_s", "epoch_seconds", "e2e_seconds", "measured_seconds"]
    )
    _positive_numbers(tr, ["e2e_speedup", "per_epoch_speedup"])
    lite0 = res["lite0_flow_training"]  # the flows of the default backbone, torch's path against msflow's
    assert set(lite0["levers"]) == {"plain", "default"} and lite0["image_size"] == 64
    for r in lite0["levers"].values():
        _positive_numbers(r, ["img_per_s", "img_per_cpu_s", "gflops", "fraction_of_bench_ceiling"])
    assert "Flow training of efficientnet_lite0 (64 px" in printed and "default vs plain: " in printed
    assert tr["ours"]["epoch_fixed_seconds"] >= 0 and np.isfinite(tr["ours"]["final_loss"])
    _positive_numbers(tr["ours"], ["holdout_nll_seconds_per_image"])
    # Time to accuracy: this run's per-image costs at the pairs' epochs (holdout_fraction 0.2 -> h 0.25).
    tta = res["time_to_accuracy"]
    first, second = tta["pairs"]
    assert first["time_to_accuracy_speedup"] == pytest.approx(round(ratio(tr, 40, 100, 0.25), 2))
    assert first["unchanged_accuracy"] and not second["unchanged_accuracy"]
    assert "Time to accuracy (vs the official loop at 100 epochs)" in printed
    assert "accuracy unchanged" in printed and "accuracy CHANGED" in printed
    kept = next(t for t in res["targets"] if t["name"] == "pairs with unchanged accuracy")
    assert kept["measured"] == 1 and kept["bound"] == 2 and kept["pass"] is False
    assert tr["loss_check"]["relative_difference"] <= 1e-4
    inf = res["inference"]
    for name in ("torch", "reference"):
        _positive_numbers(inf[name], ["img_per_s", "latency_ms"])
    _positive_numbers(inf, ["torch_speedup"])
    assert inf["onnx"] is None and "skipped" in inf["onnx_note"]
    auto = inf["auto"]  # ONNX skipped: float32 torch (or bf16 torch, on a CPU with native bf16)
    assert "onnx" not in auto["considered"] and {auto["batch"], auto["single"]} <= set(auto["considered"])
    assert f"--runtime auto would pick: {auto['batch']} at batch 4" in printed
    assert "latency at batch 1 (ms)" in printed
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    assert res["config"]["gpu"] == gpu
    assert (f"GPU: {gpu}" if gpu else "GPU: none available here") in printed
    assert inf["reference_max_score_difference"] < 1e-3  # the reference path scores like the model
    _positive_numbers(
        res["memory"], ["train_ours_peak_bytes", "train_reference_peak_bytes", "inference_peak_bytes"]
    )
    ce = res["ceiling"]
    _positive_numbers(
        ce,
        [
            "matmul_gflops",
            "gflop_per_image",
            "backbone_gflop_per_image",
            "reference_gflop_per_image",
            "torch_fraction_of_ceiling",
        ],
    )
    assert ce["counter_counts_multiply_add_as_2"] is True
    assert ce["gflop_per_image"] > ce["backbone_gflop_per_image"]
    ap = res["aupro"]
    _positive_numbers(
        ap,
        ["standard", "official", "standard_seconds", "official_seconds", "loop_seconds", "speedup_standard"],
    )
    eq = ap["equality_check"]
    assert eq["abs_difference"] <= 1e-9
    names = {row["name"] for row in res["targets"]}
    assert any("training speed-up" in n for n in names) and any("AUPRO" in n for n in names)
    for row in res["targets"]:
        expected = {">=": row["measured"] >= row["bound"], ">": row["measured"] > row["bound"]}.get(
            row["comparison"], row["measured"] <= row["bound"]
        )
        assert row["pass"] is expected and row["at_target_setting"] is False
    assert res["by_threads"][0]["threads"] == 1 and res["config"]["threads"] == [1]
    assert "=== 1 thread (torch and onnxruntime) ===" in printed and "By thread count" not in printed
    # Two thread counts: each one's tables, then the headline figures side by side.
    from benchmarks.speed.report import format_report

    two = {**res, "by_threads": [res["by_threads"][0], {**res["by_threads"][0], "threads": 2}]}
    text = format_report(two)
    assert "=== 2 threads (torch and onnxruntime) ===" in text and "By thread count" in text
    assert "timed at 1, 2 thread(s)" in text


def test_auto_pick_follows_the_measured_speeds_and_the_agreement(monkeypatch) -> None:
    from benchmarks.speed.inference import auto_pick
    from msflow.infer import runtime as rt

    monkeypatch.setattr(rt, "candidates", lambda device: ["torch", "torch-bf16", "onnx"])

    def measured(onnx_agrees: bool) -> dict:
        return {
            "torch": {"img_per_s": 2.0, "latency_ms": 300.0},
            "torch_bf16": {"img_per_s": 3.0, "latency_ms": 400.0},  # faster in batches, slower alone
            "onnx": {"img_per_s": 4.0, "latency_ms": 200.0},
            **{"torch_agrees": True, "torch_bf16_agrees": True, "onnx_agrees": onnx_agrees},
        }

    cpu = torch.device("cpu")
    assert auto_pick(measured(True), cpu) | {"considered": 0} == {
        **{"batch": "onnx", "single": "onnx", "rejected": {}, "not_offered": [], "considered": 0}
    }
    pick = auto_pick(measured(False), cpu)
    assert pick["batch"] == "torch_bf16" and pick["single"] == "torch" and list(pick["rejected"]) == ["onnx"]
    monkeypatch.setattr(rt, "candidates", lambda device: ["torch", "onnx"])  # bf16 not native here
    pick = auto_pick(measured(False), cpu)
    assert pick["batch"] == pick["single"] == "torch" and pick["not_offered"] == ["torch_bf16"]


def test_inference_phase_runs_efficientnet_lite0(one_thread) -> None:
    from dataclasses import replace

    from benchmarks.speed.inference import phase_inference
    from benchmarks.speed.settings import QUICK

    settings = replace(SpeedSettings(), **QUICK)
    settings = replace(settings, backbone="efficientnet_lite0", skip_onnx=True, batch_size=2)
    inf = phase_inference(settings)
    for name in ("torch", "reference"):
        _positive_numbers(inf[name], ["img_per_s", "latency_ms"])
    assert inf["reference_agrees"] and inf["auto"]["batch"] in inf["auto"]["considered"]


def test_settings_are_typed_and_checked() -> None:
    assert SpeedSettings().backbone == "wide_resnet50_2" and SpeedSettings().images == 64
    with pytest.raises(MSFlowError, match="--images"):
        SpeedSettings(images=0)
    with pytest.raises(MSFlowError, match="at least --batch-size"):
        SpeedSettings(images=4, batch_size=8)
    with pytest.raises(MSFlowError, match="in pairs"):
        SpeedSettings(accuracy_runs=("a",))
    with pytest.raises(MSFlowError, match="'nowhere' is not a finished run folder"):
        SpeedSettings(accuracy_runs=("nowhere", "elsewhere"))


def test_bench_without_run_pairs_says_time_to_accuracy_was_not_measured() -> None:
    from benchmarks.speed.tables import time_to_accuracy_lines

    assert time_to_accuracy_lines(None)[0].startswith("Time to accuracy: not measured in this run")


def test_bench_without_a_source_checkout_is_one_clear_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "benchmarks")
    assert main(["speed", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "source checkout" in err


def test_a_runtime_row_is_one_line_and_appears_in_the_table(one_thread, monkeypatch) -> None:
    from dataclasses import replace

    from benchmarks.speed import inference
    from benchmarks.speed.settings import QUICK
    from benchmarks.speed.tables import inference_lines

    # A runtime the harness did not know: one row, here float32 torch again under another name.
    extra = inference.RuntimeRow("torch_again", "torch", asked=lambda p: True)
    monkeypatch.setattr(inference, "RUNTIME_ROWS", (*inference.RUNTIME_ROWS, extra))
    settings = replace(
        SpeedSettings(), **{**QUICK, "skip_onnx": True, "batch_size": 2, "inference_repeats": 1}
    )
    inf = inference.phase_inference(settings)
    _positive_numbers(inf["torch_again"], ["img_per_s", "latency_ms"])
    assert inf["torch_again_agrees"] and inf["torch_again_max_score_difference"] == 0.0
    assert inf["onnx"] is None and inf["onnx_note"] == "skipped (--skip-onnx)"
    header = inference_lines(inf)[0].split()
    assert header[:3] == ["Inference", "torch", "reference"] and header[-2:] == ["torch", "again"]


def test_every_timed_call_starts_after_a_quiet_gap(monkeypatch) -> None:
    from benchmarks.speed import inference

    slept: list[float] = []
    monkeypatch.setattr(inference.time, "sleep", slept.append)
    calls: list[str] = []
    runners = {k: (lambda x, k=k: calls.append(k)) for k in ("torch", "reference", "onnx")}
    inference.time_rounds(runners, torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4), 2, torch.device("cpu"))
    # 2 batch rounds and 3 batch-1 rounds of 3 runtimes, each after onnxruntime's spinning has stopped
    assert len(calls) == 15 and slept == [inference.SETTLE_SECONDS] * 15 and inference.SETTLE_SECONDS >= 0.05


def test_thread_counts_default_to_one_and_all_cores() -> None:
    from benchmarks.speed.settings import build_parser, settings_from_args

    assert SpeedSettings().thread_counts() == tuple(dict.fromkeys((1, os.cpu_count())))
    args = build_parser("speed").parse_args(["--threads", "2", "1", "2"])
    assert settings_from_args(args).thread_counts() == (2, 1)
    with pytest.raises(MSFlowError, match="--threads"):
        SpeedSettings(threads=(0,))


def test_batch1_times_torch_its_old_input_layout_and_the_reference(tmp_path, capsys) -> None:
    from benchmarks.speed import batch1

    out = tmp_path / "batch1.json"
    argv = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--threads", "1", "--rounds", "2"]
    assert batch1.main([*argv, "--batch-size", "2", "--gap", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for path in ("torch ", "torch NCHW input", "reference"):
        assert f"1 thr, batch 1, {path}" in printed and f"1 thr, batch 2, {path}" in printed
    results = json.loads(out.read_text())["results"]
    assert [(r["threads"], r["batch"]) for r in results] == [(1, 1), (1, 2)]
    assert all(len(t["cpu_ms"]) == 2 for r in results for t in r["times"].values())


def test_flow_paths_differ_where_msflow_differs_from_torch(one_thread) -> None:
    from benchmarks.speed import flow_paths
    from msflow.train.loop import make_optimizer

    trainer = flow_paths.FlowTrainer("efficientnet_lite0", 64, batch_size=2, steps=1)
    plain, default = trainer.optimizers["plain"], trainer.optimizers["default"]
    assert plain.defaults["foreach"] is False and plain.defaults.get("fused") in (None, False)
    own = make_optimizer(trainer.model.trainable_parameters(), 1e-4, torch.device("cpu"))
    assert type(default) is type(own) and default.defaults == own.defaults
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    for path, layout in (("plain", "contiguous"), ("default", "auto")):
        seconds = trainer.epoch(path)
        assert trainer.model.flow_layout == layout and seconds["wall"] > 0 and seconds["cpu"] > 0
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.model.trainable_parameters(), strict=True)]
    assert all(moved)  # each epoch really trained every flow parameter
    # One step's FLOPs: the forward and its backward (about twice the forward) of the flows.
    feats = trainer.cache.batch(torch.arange(2))
    with torch.no_grad():
        from benchmarks.speed.machine import count_flops

        forward = count_flops(lambda: trainer.model.flow(feats)) / 2 / 1e9
    assert 2 * forward < trainer.step_gflop() < 3.5 * forward  # 2.65x here


def test_flow_paths_measure_reports_both_paths_against_plain(one_thread) -> None:
    from benchmarks.speed.flow_paths import measure

    res = measure("efficientnet_lite0", 64, batch_size=2, steps=1, rounds=2, threads=1)
    assert res["threads"] == 1 and set(res["levers"]) == {"plain", "default"} and res["gflop_per_image"] > 0
    plain, default = res["levers"]["plain"], res["levers"]["default"]
    assert plain["speedup"] == plain["speedup_cpu"] == 1.0
    for r in (plain, default):
        _positive_numbers(r, ["img_per_s", "img_per_cpu_s", "gflops", "first_epoch_seconds"])
        assert r["gflops"] == pytest.approx(r["img_per_s"] * res["gflop_per_image"])
    assert default["speedup"] == pytest.approx(default["img_per_s"] / plain["img_per_s"])
