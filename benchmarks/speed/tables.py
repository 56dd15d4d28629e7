"""The printed tables of one thread count: training, time to accuracy, Lite0, inference, ceiling, memory."""

from __future__ import annotations

from benchmarks.speed import inference
from benchmarks.speed.inference import REFERENCE
from benchmarks.speed.machine import GB


def row(label: str, *cells: str) -> str:
    return f"  {label:<42}" + " ".join(f"{c:>12}" for c in cells)


def _training_rows(o: dict, r: dict, n: int, ep: int, indent: str = "") -> list[str]:
    table = [  # label, format, our key, the reference's key, ratio key
        ("training steps (img/s)", "{:.2f}", "flow_train_img_per_s", "train_img_per_s", "steps_speedup"),
        (f"one epoch of {n} images (s)", "{:.1f}", "epoch_seconds", "epoch_seconds", "per_epoch_speedup"),
        ("measured wall time (s)", "{:.1f}", "measured_seconds", "measured_seconds", None),
        (f"end-to-end, {ep} epochs (s, extrapolated)", "{:.0f}", "e2e_seconds", "e2e_seconds", "e2e_speedup"),
    ]
    return [
        row(indent + label, fmt.format(o[mine]), fmt.format(r[ref]), *([f"{o[x]:.2f}x"] if x else []))
        for label, fmt, mine, ref, x in table
    ]


def training_lines(tr: dict, p: dict) -> list[str]:
    o, r, n, ep = tr["ours"], tr["reference"], p["images"], p["epochs"]
    lc = tr["loss_check"]
    lines = [
        "Training" + row("", "ours", "reference", "ratio")[8:],
        row("feature extraction, once (img/s)", f"{o['extract_img_per_s']:.2f}", "-"),
        *_training_rows(o, r, n, ep),
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
            *_training_rows(b, r, n, ep, "  "),
            f"    measured: {b['extract_seconds']:.1f} s extraction + {b['train_images']} images "
            f"({b['train_steps']} steps, {b['train_seconds']:.1f} s); "
            f"loss {b['final_loss']:.6g} (float32 {o['final_loss']:.6g})",
        ]
    return lines


def time_to_accuracy_lines(tta: dict | None) -> list[str]:
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


def timed_runtimes(inf: dict) -> list[str]:
    """float32 torch, the reference, then every other runtime that ran, in ``RUNTIME_ROWS`` order."""
    first, *others = (r.key for r in inference.RUNTIME_ROWS)
    return [first, REFERENCE, *(k for k in others if inf.get(k))]


def _agreement(inf: dict, names: list[str]) -> str:
    from msflow.infer.runtime import MAP_TOLERANCE, SCORE_TOLERANCE

    checks = [
        f"{k.replace('_', ' ')} {'agrees' if inf[k + '_agrees'] else 'DISAGREES'} (score "
        f"{inf[k + '_differences']['score']:.1e}, maps {inf[k + '_differences']['pixel_map']:.1e} / "
        f"{inf[k + '_differences']['image_map']:.1e})"
        for k in names[1:]
    ]
    return (
        f"  check against float32 torch (tolerance: score {SCORE_TOLERANCE:g} of its scale, maps "
        f"{MAP_TOLERANCE:g} of their range): " + "; ".join(checks)
    )


def inference_lines(inf: dict) -> list[str]:
    names = timed_runtimes(inf)

    def line(label: str, fmt: str, value) -> str:
        return row(label, *(fmt.format(value(k)) for k in names))

    lines = [
        "Inference" + row("", *(k.replace("_", " ") for k in names))[9:],
        line(f"img/s at batch {inf['batch_size']}", "{:.2f}", lambda k: inf[k]["img_per_s"]),
        line("latency at batch 1 (ms)", "{:.0f}", lambda k: inf[k]["latency_ms"]),
        line("img/s vs reference", "{:.2f}x", lambda k: inf[f"{k}_speedup"]),
        line("latency vs reference", "{:.2f}x", lambda k: inf[f"{k}_latency_speedup"]),
        "  same scores, max |difference| to torch: "
        + ", ".join(f"{k.replace('_', ' ')} {inf[k + '_max_score_difference']:.1e}" for k in names[1:]),
    ]
    for r in inference.RUNTIME_ROWS[1:]:
        if inf.get(f"{r.key}_note"):
            lines.append(f"  {r.key.replace('_', ' ')}: {inf[r.key + '_note']}")
        elif f"{r.key}_open_seconds" in inf:
            lines.append(
                f"  {r.key.replace('_', ' ')}: export {inf[r.key + '_open_seconds']:.1f} s, "
                f"file {inf[r.key + '_file_bytes'] / 1e6:.0f} MB"
            )
    auto = inf["auto"]
    return lines + [
        _agreement(inf, names),
        f"  --runtime auto would pick: {auto['batch']} at batch {inf['batch_size']} (msflow predict), "
        f"{auto['single']} at batch 1 (msflow serve); considered {', '.join(auto['considered'])}"
        + "".join(f"; {k} rejected ({why})" for k, why in auto["rejected"].items())
        + "".join(f"; {k} not offered on this machine" for k in auto["not_offered"]),
    ]


def lite0_lines(lt: dict, ceiling: float) -> list[str]:
    plain, default = lt["levers"]["plain"], lt["levers"]["default"]
    lines = [
        f"Flow training of efficientnet_lite0 ({lt['image_size']} px, batch {lt['batch_size']}, "
        f"{lt['threads']} thread(s), random cached features; {lt['gflop_per_image']:.2f} GFLOP per image)",
        row("", "img/s", "GFLOP/s", "of ceiling", "img/CPU-s"),
    ]
    for label, r in (
        ("plain path (NCHW, for-loop Adam)", plain),
        ("default path (channels-last, foreach Adam)", default),
    ):
        share = f"{100 * r['gflops'] / ceiling:.0f} %"
        lines.append(
            row(label, f"{r['img_per_s']:.2f}", f"{r['gflops']:.1f}", share, f"{r['img_per_cpu_s']:.2f}")
        )
    lines.append(
        f"  default vs plain: {default['speedup']:.2f}x (wall clock), "
        f"{default['speedup_cpu']:.2f}x (CPU time); vs the matmul below ({ceiling:.1f} GFLOP/s)"
    )
    return lines


def ceiling_lines(ce: dict) -> list[str]:
    return [
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
            for k in [*(r.key for r in inference.RUNTIME_ROWS), REFERENCE]
            if f"{k}_achieved_gflops" in ce
        ),
    ]


def memory_lines(mem: dict) -> list[str]:
    return [
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
