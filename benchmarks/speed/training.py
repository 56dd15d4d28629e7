"""The training phases: ours (extract once, train the flows from the cache), the reference, Lite0's flows.

- **Ours.** :meth:`msflow.train.features.FeatureCache.build` extracts (and standardises) the features of
  ``images`` PNG files once; :func:`msflow.train.loop.train_flows` then trains the flows from the cache
  (with ``--cpu-bf16`` also under bfloat16 autocast). One epoch over M and over 2M cached images gives
  the cost per image and the fixed cost per epoch (the loop's roll-back snapshots), extrapolated
  linearly to ``epochs`` (every epoch is identical work).
- **Reference** (``benchmarks/reference.py``): the official schedule on the same weights, in float32;
  its loss is checked against ours.
- **EfficientNet-Lite0 flows.** Flow-training img/s of the default backbone on the plain path (NCHW,
  Adam's for-loop: torch's defaults) and on msflow's default path (channels-last on oneDNN CPUs,
  foreach Adam), from :mod:`benchmarks.speed.flow_paths`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from benchmarks.speed.machine import log, peaks, timed
from benchmarks.speed.settings import SpeedSettings


def setup(p: SpeedSettings, n: int):
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


def extrapolate(
    seconds: float, images: int, p: SpeedSettings, extract: float = 0.0, per_epoch: float = 0.0
) -> dict:
    """One epoch of all images from a measured rate, and the linear extrapolation to ``epochs``."""
    epoch = seconds * p.images / images + per_epoch
    return {"epoch_seconds": epoch, "e2e_seconds": extract + p.epochs * epoch}


def write_images(images, folder: Path) -> list:
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


def _extract(p: SpeedSettings, model, images, device):
    """(seconds, cache) of FeatureCache.build over the images written as PNG files."""
    from msflow.train.features import FeatureCache

    bs = p.batch_size
    with tempfile.TemporaryDirectory(prefix="msflow-speed-") as folder:
        samples = write_images(images, Path(folder))
        FeatureCache.build(model, samples[:bs], device, bs, where="memory", progress=False)  # warm-up
        return timed(
            lambda: FeatureCache.build(model, samples, device, bs, where="memory", progress=False), device
        )


def _train_epochs(p: SpeedSettings, model, cache, device, bf16: bool) -> dict:
    """Epochs of train_flows over m and 2m cached images: the per-image and the fixed per-epoch cost."""
    from msflow.config import TrainConfig
    from msflow.train.features import FeatureCache
    from msflow.train.loop import TrainState, make_optimizer, train_flows

    bs, n = p.batch_size, p.images
    optimizer = make_optimizer(model.trainable_parameters(), 1e-4, device)  # what msflow train runs
    # The official lr, clip and batch; no CUDA AMP (the reference has none); bf16 only when asked.
    cfg = TrainConfig(epochs=1, batch_size=bs, amp=False, seed=p.seed, cpu_bf16=bf16)

    def epoch_over(m: int):  # one epoch of train_flows over the first m cached images
        part = FeatureCache([a[:m] for a in cache.arrays])
        return train_flows(model, part, cfg, device, TrainState(), optimizer, progress=False)

    epoch_over(bs)  # warm-up: Adam state, kernels
    m = max(bs, min(p.measure_steps * bs, n // 2) // bs * bs)
    t_small, _ = timed(lambda: epoch_over(m), device)
    t_large, state = timed(lambda: epoch_over(2 * m), device)
    # t = fixed + m * per_image: two epoch lengths separate the per-image cost from the per-epoch cost
    # (train_flows snapshots the flows and optimizer at every epoch, its roll-back point).
    per_image = (t_large - t_small) / m if t_large > t_small else t_large / (2 * m)
    log(f"  ours: train_flows epochs of {m} and {2 * m} cached images in {t_small:.2f} s and {t_large:.2f} s")
    return {
        "per_image": per_image,
        "epoch_fixed_seconds": max(t_small - m * per_image, 0.0),
        "train_seconds": t_small + t_large,
        "train_images": 3 * m,
        "train_steps": 3 * math.ceil(m / bs),
        "final_loss": state.history[-1]["loss"],
    }


def phase_train_ours(p: SpeedSettings, bf16: bool = False) -> dict:
    """FeatureCache.build on image files, then train_flows from the cache: the product's own functions."""
    from msflow.train.features import FeatureCache
    from msflow.train.loop import holdout_nll

    n = p.images
    device, model, images = setup(p, n)
    t_extract, cache = _extract(p, model, images, device)
    log(f"  ours: FeatureCache.build of {n} image files in {t_extract:.1f} s")
    tr = _train_epochs(p, model, cache, device, bf16)
    # The plateau rule's extra cost: after every epoch, the NLL of the held-out images (a forward pass).
    holdout_nll(model, FeatureCache([a[: p.batch_size] for a in cache.arrays]), device)  # warm-up
    t_nll, _ = timed(lambda: holdout_nll(model, cache, device), device)
    log(f"  ours: held-out NLL of {n} cached images in {t_nll:.2f} s")
    per_image = tr.pop("per_image")
    return {
        **extrapolate(per_image * n, n, p, extract=t_extract, per_epoch=tr["epoch_fixed_seconds"]),
        "measured_seconds": t_extract + tr["train_seconds"],
        "extract_img_per_s": n / t_extract,
        "flow_train_img_per_s": 1.0 / per_image,
        "extract_seconds": t_extract,
        "extract_images": n,
        **tr,
        "holdout_nll_seconds_per_image": t_nll / n,
        **peaks(device),
    }


def phase_train_reference(p: SpeedSettings) -> dict:
    """The official schedule (``benchmarks/reference.py``), timed over ``measure_steps`` steps."""
    import torch

    from benchmarks.reference import ReferencePath, check_loss, reference_step, unfrozen_backbone

    bs, n = p.batch_size, p.images
    device, model, images = setup(p, n)
    ref = ReferencePath(model)
    check = check_loss(model, ref, images[: min(bs, 2)])
    log(f"  loss check on {check['images']} images: relative difference {check['relative_difference']:.2e}")
    batches = list(torch.randperm(n, generator=torch.Generator().manual_seed(p.seed)).split(bs))
    chosen = batches[: p.measure_steps]
    step = reference_step(model, ref, images)
    with unfrozen_backbone(model):
        step(batches[0])  # warm-up
        t_train, losses = timed(lambda: [step(b) for b in chosen], device)
    measured = sum(len(b) for b in chosen)
    log(f"  reference: {len(chosen)} steps ({measured} images, backbone fwd+bwd) in {t_train:.1f} s")
    return {
        **extrapolate(t_train, measured, p),
        "measured_seconds": t_train,
        "train_img_per_s": measured / t_train,
        "train_seconds": t_train,
        "train_images": measured,
        "train_steps": len(chosen),
        "final_loss": losses[-1],
        "loss_check": check,
        **peaks(device),
    }


def phase_train_lite0(p: SpeedSettings) -> dict:
    """train_flows of EfficientNet-Lite0's flows from random cached features: plain vs default path."""
    import torch

    from benchmarks.speed.flow_paths import measure

    res = measure(
        "efficientnet_lite0",
        p.lite0_image_size,
        p.batch_size,
        steps=p.lite0_steps,
        threads=torch.get_num_threads(),
    )
    for name, r in res["levers"].items():
        log(f"  lite0 flows, {name} path: {r['img_per_s']:.2f} img/s, {r['gflops']:.1f} GFLOP/s")
    return {
        **res,
        "image_size": p.lite0_image_size,
        "batch_size": p.batch_size,
        **peaks(torch.device("cpu")),
    }


def training_summary(ours: dict, ref: dict, bf16: dict | None) -> dict:
    """Ours (and bf16) against the reference: steps, one epoch, end to end."""
    for run in (ours, bf16):
        if run:
            run["steps_speedup"] = run["flow_train_img_per_s"] / ref["train_img_per_s"]
            run["per_epoch_speedup"] = ref["epoch_seconds"] / run["epoch_seconds"]
            run["e2e_speedup"] = ref["e2e_seconds"] / run["e2e_seconds"]
    tr = {"ours": ours, "reference": ref, "loss_check": ref["loss_check"]}
    tr.update(per_epoch_speedup=ours["per_epoch_speedup"], e2e_speedup=ours["e2e_speedup"])
    return {**tr, "ours_bf16": bf16} if bf16 else tr
