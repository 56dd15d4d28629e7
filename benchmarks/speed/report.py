"""The verdicts against the targets and the whole printed report: the machine, then each thread count's
tables, the thread counts side by side, AUPRO."""

from __future__ import annotations

from benchmarks.speed import tables
from benchmarks.speed.machine import GB, machine_lines
from benchmarks.speed.settings import (
    TARGET_AUPRO,
    TARGET_E2E,
    TARGET_INFERENCE,
    TARGET_PEAK_GB,
    TARGET_SETTING,
)


def targets(run: dict, p: dict, aupro: dict | None) -> list[dict]:
    """Each target as numbers for one thread count's ``run``: measured value, bound, whether it holds."""
    tr, inf = run["training"], run["inference"]
    rows = [("end-to-end training speed-up vs reference", tr["e2e_speedup"], ">=", TARGET_E2E, "x")]
    if "ours_bf16" in tr:
        rows.append(
            ("end-to-end training speed-up, bf16", tr["ours_bf16"]["e2e_speedup"], ">=", TARGET_E2E, "x")
        )
    rows.append(("torch inference img/s vs reference", inf["torch_speedup"], ">=", TARGET_INFERENCE, "x"))
    if inf.get("onnx"):
        rows.append(
            (
                "ONNX inference img/s vs torch",
                inf["onnx"]["img_per_s"] / inf["torch"]["img_per_s"],
                ">",
                1.0,
                "x",
            )
        )
    tta = run.get("time_to_accuracy")
    if tta:
        slowest = min(r["time_to_accuracy_speedup"] for r in tta["pairs"])
        rows.append(("time to accuracy vs reference (slowest pair)", slowest, ">=", TARGET_E2E, "x"))
        kept = sum(r["unchanged_accuracy"] for r in tta["pairs"])
        rows.append(("pairs with unchanged accuracy", kept, ">=", len(tta["pairs"]), ""))
    peak = run["memory"]["train_ours_peak_bytes"] / GB
    rows.append(("training peak memory (ours, RSS)", peak, "<=", TARGET_PEAK_GB, " GB"))
    if aupro:
        rows.append(
            ("AUPRO speed-up vs 800-threshold loop", aupro["speedup_standard"], ">=", TARGET_AUPRO, "x")
        )
    at_target = all(p[k] == v for k, v in TARGET_SETTING.items()) and not p["pretrained"]
    holds = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b}
    return [
        {
            **{"name": name, "measured": value, "comparison": op, "bound": bound, "unit": unit},
            **{"pass": bool(holds[op](value, bound)), "at_target_setting": at_target},
        }
        for name, value, op, bound, unit in rows
    ]


def target_lines(rows: list[dict]) -> list[str]:
    setting = ", ".join(f"{k} {v}" for k, v in TARGET_SETTING.items())
    lines = [f"Targets (stated for {setting}, random weights)"]
    for t in rows:
        bound = f"{t['comparison']} {t['bound']:g}{t['unit']}"
        verdict = "PASS" if t["pass"] else "FAIL"
        lines.append(f"  {verdict}  {t['name']:<44} {bound:<12} measured {t['measured']:.2f}{t['unit']}")
    if not all(t["at_target_setting"] for t in rows):
        lines.append("  (this run is not at the targets' setting, so these verdicts are indicative only)")
    return lines


def thread_count_lines(run: dict, p: dict) -> list[str]:
    """Every table of one thread count."""
    n, ce = run["threads"], run["ceiling"]
    lines = [f"=== {n} thread{'s' if n > 1 else ''} (torch and onnxruntime) ===", ""]
    lines += [*tables.training_lines(run["training"], p), ""]
    lines += [*tables.time_to_accuracy_lines(run.get("time_to_accuracy")), ""]
    if run.get("lite0_flow_training"):
        lines += [*tables.lite0_lines(run["lite0_flow_training"], ce["matmul_gflops"]), ""]
    lines += [*tables.inference_lines(run["inference"]), ""]
    lines += [*tables.ceiling_lines(ce), "", *tables.memory_lines(run["memory"]), ""]
    return lines + target_lines(run["targets"])


def side_by_side_lines(runs: list[dict]) -> list[str]:
    """The headline figures of every thread count in one table (only when more than one ran)."""
    if len(runs) < 2:
        return []
    bs = runs[0]["inference"]["batch_size"]
    names = tables.timed_runtimes(runs[0]["inference"])
    rows = [
        ("training end to end vs reference", lambda r: f"{r['training']['e2e_speedup']:.2f}x"),
        ("training steps img/s, ours", lambda r: f"{r['training']['ours']['flow_train_img_per_s']:.2f}"),
        *(
            (
                f"{k.replace('_', ' ')}: img/s at batch {bs}",
                lambda r, k=k: f"{r['inference'][k]['img_per_s']:.2f}",
            )
            for k in names
        ),
        *(
            (
                f"{k.replace('_', ' ')}: batch-1 latency (ms)",
                lambda r, k=k: f"{r['inference'][k]['latency_ms']:.0f}",
            )
            for k in names
        ),
        ("float32 matmul ceiling (GFLOP/s)", lambda r: f"{r['ceiling']['matmul_gflops']:.1f}"),
        (
            "--runtime auto at batch 1 / batch",
            lambda r: f"{r['inference']['auto']['single']}/{r['inference']['auto']['batch']}",
        ),
    ]
    head = tables.row("", *(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}" for r in runs))
    lines = ["By thread count" + head[15:]]
    for label, cell in rows:
        lines.append(
            tables.row(label, *(cell(r) if all(k in r["inference"] for k in names) else "-" for r in runs))
        )
    return lines


def aupro_lines(ap: dict | None) -> list[str]:
    if not ap:
        return []
    eq, done, total = ap["equality_check"], ap["loop_thresholds_measured"], ap["loop_thresholds_total"]
    how = f"{ap['loop_measured_seconds']:.1f} s for {done} of {total} thresholds, x{total / done:.0f}"
    return [
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


def format_report(res: dict) -> str:
    p = res["config"]
    runs = res["by_threads"]
    lines = [
        f"MSFlow speed: {p['backbone']} ({'ImageNet' if p['pretrained'] else 'random'} weights), "
        f"{p['image_size']} px, batch {p['batch_size']}, {p['images']} images, {p['epochs']} epochs, "
        f"{p['device_resolved']}, fp32" + (" (+ bf16)" if p["cpu_bf16"] else ""),
        *machine_lines(p, p, [r["threads"] for r in runs]),
        "",
    ]
    for run in runs:
        lines += [*thread_count_lines(run, p), ""]
    lines += side_by_side_lines(runs)
    return "\n".join(lines + aupro_lines(res["aupro"])).rstrip()
