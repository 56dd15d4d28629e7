"""The official code's way of running MSFlow, for the speed harness (``benchmarks/speed/``).

It runs an :class:`~msflow.model.msflow.MSFlow`'s own weights the way the official code (cool-xuan/msflow)
runs them (``docs/official-code-differences.md``, B8 and B10):

- every training step runs the backbone forward with autograd and back-propagates through it; the
  backbone has ``requires_grad=True`` and its ``.grad`` buffers accumulate (B8);
- the positional encoding is rebuilt on the CPU for every scale of every batch and repeated over the
  batch (B10);
- each coupling block runs its subnet on ``cat([x1, cond])`` through the full first conv, and the channel
  permutation is a 1x1 convolution with a one-hot matrix, as FrEIA 0.2's ``AllInOneBlock`` does.

Also the official AUPRO loop (800 thresholds, B11), which :func:`msflow.evaluate.metrics.aupro` is timed
against. This file is a deliberate second way of computing the same numbers (tests/test_bench.py proves
that it agrees with the model), so it lives with the benchmark, outside the shipped package.

The reference stays in float32, the official code's precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from msflow.errors import MSFlowError
from msflow.model.loss import nll
from msflow.model.msflow import FlowOutput, MSFlow
from msflow.model.parallel_flow import positional_encoding_2d


def one_hot_permutation(perm: torch.Tensor) -> torch.Tensor:
    """FrEIA's permutation matrix (C, C, 1, 1): ``conv2d(x, w)[:, i] = x[:, perm[i]]``."""
    c = perm.numel()
    w = torch.zeros(c, c, dtype=torch.get_default_dtype(), device=perm.device)
    w[torch.arange(c, device=perm.device), perm] = 1.0
    return w.view(c, c, 1, 1)


def reference_block_forward(block, x, cond, w_perm=None):
    """One :class:`~msflow.model.coupling.AffineCouplingBlock` the FrEIA 0.2 way; returns ``(y, log_det)``.

    ``cond`` has the batch size (not 1) and goes through the full first conv; mathematically identical to
    ``block(x, cond)``, which splits that conv and indexes the channels.
    """
    x1, x2 = x[:, : block.passive], x[:, block.passive :]
    a = 0.1 * block.subnet(torch.cat([x1, cond.expand(x.shape[0], -1, -1, -1)], dim=1))
    s, t = a[:, : block.active], a[:, block.active :]
    if block.clamp == "freia02":
        log_scale = block.clamp_alpha * torch.tanh(s)
    else:
        log_scale = block.clamp_alpha * torch.tanh(s / block.clamp_alpha)
    y = torch.cat([x1, x2 * torch.exp(log_scale) + t], dim=1)
    gamma = block.global_scale()
    if w_perm is None:
        w_perm = one_hot_permutation(block.perm)
    y = F.conv2d(y * gamma + block.global_offset, w_perm.to(y.dtype))
    pixels = x.shape[2] * x.shape[3]
    return y, log_scale.sum(dim=(1, 2, 3)) + pixels * torch.log(gamma).sum()


class ReferencePath:
    """The official way of running ``model``: features with autograd, per-batch encodings, FrEIA blocks."""

    def __init__(self, model: MSFlow) -> None:
        self.model = model
        # Built once: FrEIA keeps its permutation matrices as parameters.
        self.w_perms = [[one_hot_permutation(b.perm) for b in flow.blocks] for flow in model.parallel_flows]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Standardised backbone features, with autograd as the caller has it (official: no no_grad, B8)."""
        return self.model.standardize(self.model.backbone.raw_features(images))

    def flow(self, feats: list[torch.Tensor]) -> FlowOutput:
        model = self.model
        zs, log_det = [], feats[0].new_zeros(feats[0].shape[0])
        for flow, x, w_perms in zip(model.parallel_flows, feats, self.w_perms, strict=True):
            b, _, h, w = x.shape
            # Official: positional_encoding_2d(...).to(device).unsqueeze(0).repeat(b, 1, 1, 1) per batch.
            cond = positional_encoding_2d(model.config.cond_channels, h, w).to(x.device, x.dtype)
            cond = cond.unsqueeze(0).repeat(b, 1, 1, 1)
            for block, w_perm in zip(flow.blocks, w_perms, strict=True):
                x, ld = reference_block_forward(block, x, cond, w_perm)
                log_det = log_det + ld
            zs.append(x)
        zs, ld_fusion = model.fusion_flow(zs)
        return FlowOutput(zs, log_det + ld_fusion)

    def predict(self, images: torch.Tensor):
        """Reference inference: the same anomaly maps and scores as ``model.predict``."""
        with torch.no_grad():
            return self.model.anomaly(self.flow(self.features(images)).zs)


def check_loss(model: MSFlow, ref: ReferencePath, images: torch.Tensor, rtol: float = 1e-4) -> dict:
    """Same weights, same batch: the reference loss must equal the fast path's (raises otherwise)."""
    with torch.no_grad():
        fast_out = model.flow(model.standardize(model.extract(images)))
        fast = float(nll(fast_out.zs, fast_out.log_det).mean())
        ref_out = ref.flow(ref.features(images))
        slow = float(nll(ref_out.zs, ref_out.log_det).mean())
    rel = abs(fast - slow) / max(abs(fast), 1e-12)
    if not rel <= rtol:
        raise MSFlowError(
            f"bench: reference and fast losses differ by {rel:.2e} relative (fast {fast}, ref {slow})"
        )
    return {"images": len(images), "fast": fast, "reference": slow, "relative_difference": rel}


@contextmanager
def unfrozen_backbone(model: MSFlow) -> Iterator[None]:
    """Official B8: the extractor is not frozen for autograd; restored (and its grads dropped) after."""
    model.backbone.requires_grad_(True)
    try:
        yield
    finally:
        model.backbone.requires_grad_(False)
        for q in model.backbone.parameters():
            q.grad = None


def reference_step(
    model: MSFlow, ref: ReferencePath, images: torch.Tensor
) -> Callable[[torch.Tensor], float]:
    """One official training step on ``images[idx]`` (use inside :func:`unfrozen_backbone`); returns the loss.

    Adam at lr 1e-4 and clipping at norm 2, as the official code and our engine.
    """
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step(idx: torch.Tensor) -> float:
        out = ref.flow(ref.features(images[idx]))
        loss = nll(out.zs, out.log_det).mean()
        optimizer.zero_grad(set_to_none=True)  # the flows' gradients; the backbone's accumulate (B8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        return loss.item()

    return step


def _official_single(maps, masks, threshold: float) -> tuple[float, float]:
    """One threshold of the official ``eval_seg_pro`` worker, with ``np.bool`` read as ``bool``."""
    import numpy as np
    from skimage import measure

    binary = np.zeros_like(maps, dtype=bool)
    binary[maps <= threshold] = 0
    binary[maps > threshold] = 1
    pro = []
    for binary_map, mask in zip(binary, masks, strict=True):
        for region in measure.regionprops(measure.label(mask)):
            tp = binary_map[region.coords[:, 0], region.coords[:, 1]].sum()
            pro.append(tp / region.area)
    inverse = 1 - masks
    fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
    return float(np.mean(pro)), float(fpr)


def official_pro_loop(
    masks, maps, thresholds: int | None = None, max_step: int = 800, expect_fpr: float = 0.3
):
    """The official AUPRO (B11, without its pool): 800 thresholds, each binarising and re-labelling all.

    ``thresholds``: time only this many, evenly spread (no value then).
    Returns (PRO in percent or None, seconds, thresholds evaluated, thresholds in all).
    """
    import numpy as np
    from sklearn.metrics import auc

    start = time.perf_counter()
    max_th, min_th = maps.max(), maps.min()
    every = np.arange(min_th, max_th, (max_th - min_th) / max_step).tolist()
    chosen = every
    if thresholds is not None and thresholds < len(every):
        chosen = every[:: math.ceil(len(every) / thresholds)]
    results = np.array([_official_single(maps, masks, t) for t in chosen])
    seconds = time.perf_counter() - start
    if len(chosen) < len(every):
        return None, seconds, len(chosen), len(every)
    keep = results[:, 1] < expect_fpr
    f = results[keep, 1]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, results[keep, 0]) * 100), seconds, len(chosen), len(every)
