"""What one run of the speed harness depends on: its settings, ``--quick``, the targets, the flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from msflow.config import BackboneName, add_option_argument, option, option_fields
from msflow.errors import MSFlowError


@dataclass(frozen=True)
class SpeedSettings:
    """Everything one run of the harness depends on; ``msflow speed`` derives its flags from these."""

    backbone: BackboneName = option("wide_resnet50_2", "backbone to time")
    image_size: int = option(256, "input side in pixels")
    batch_size: int = option(8, "training and inference batch")
    images: int = option(64, "training images M")
    epochs: int = option(100, "epochs N of the extrapolated end-to-end schedule")
    measure_steps: int = option(2, "timed training steps per path (the reference's; ours times twice that)")
    inference_repeats: int = option(2, "timed rounds per runtime")
    threads: tuple[int, ...] = option(
        (), "torch/onnxruntime thread counts, each timed in full (default: 1 and all cores)"
    )
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
        # JSON and argparse hand lists over; the thread counts are kept in the order given, once each.
        object.__setattr__(self, "threads", tuple(dict.fromkeys(int(n) for n in self.threads)))
        object.__setattr__(self, "accuracy_runs", tuple(self.accuracy_runs))
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if f.name == "threads" else (value,)
            if any(type(v) is int and f.name != "seed" and v < 1 for v in values):
                raise MSFlowError(f"speed: --{f.name.replace('_', '-')} must be >= 1, got {value}")
        if len(self.accuracy_runs) % 2:
            raise MSFlowError(
                "speed: --accuracy-runs takes run folders in pairs OURS REFERENCE, "
                f"got {len(self.accuracy_runs)}"
            )
        for run in self.accuracy_runs:
            if not (Path(run) / "metrics.json").is_file():
                raise MSFlowError(f"speed: '{run}' is not a finished run folder (no metrics.json)")
        if self.images < self.batch_size:
            raise MSFlowError(
                f"speed: --images ({self.images}) must be at least --batch-size ({self.batch_size})"
            )

    def thread_counts(self) -> tuple[int, ...]:
        """The thread counts to time: as given, else 1 and all of this machine's cores."""
        return self.threads or tuple(dict.fromkeys((1, os.cpu_count() or 1)))


# Tiny sizes for tests (``--quick``); explicit flags win.
QUICK = {
    **{"backbone": "resnet18", "image_size": 64, "batch_size": 4, "images": 8, "threads": (1,)},
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


def build_parser(description: str) -> argparse.ArgumentParser:
    """``msflow speed`` / ``python -m benchmarks.speed``: one flag per :class:`SpeedSettings` field."""
    parser = argparse.ArgumentParser(prog="msflow speed", description=description)
    for f, hint in option_fields(SpeedSettings):
        add_option_argument(parser, f, hint, dest=f.name)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes for tests: resnet18, 64 px, 8 images, 1 thread"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SpeedSettings:
    """Defaults (or ``--quick``'s tiny sizes), then every flag that was given."""
    base = replace(SpeedSettings(), **QUICK) if args.quick else SpeedSettings()
    given = {
        f.name: getattr(args, f.name) for f in fields(SpeedSettings) if getattr(args, f.name) is not None
    }
    return replace(base, **given)
