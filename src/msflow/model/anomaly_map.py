"""From latents to anomaly maps and image scores, as the official code computes them.

Per scale, the log-likelihood map is logp_s = -0.5 * mean_c z_s^2 (no log-det term, as in the paper: B16);
maps are up-sampled bilinearly with align_corners=True to the model's input size. Each map kind has one
formula, in :func:`score_map`:

- ``mul`` (the paper's image map): L = sum_s up(logp_s), the log of the product of the scale
  likelihoods; A_mul = 1 - exp(L - max L). ``gmul``: the same against the global reference;
- ``add`` (the paper's pixel map): P_s = exp(logp_s - max logp_s); S = sum_s up(P_s); A_add = max S - S.
  ``gadd``: against the per-scale global references, A = n_scales - S;
- ``logp``: the raw negative log-likelihood -L, no reference and no exp squashing: an image that is
  less likely everywhere scores higher, and a small defect is not averaged away by a 3 % share;
- ``scales`` (scores only, :func:`image_score`): the sum over scales of each scale's own reduced
  -logp_s, so a defect that one scale sees is not diluted by the others'.

With ``normalization="per_image"`` (official) the reference is the image's own maximum, so every image
has a pixel scored 0 and the maps are relative. With ``"global"`` (ours, B15) it comes from training
images (the mean of their per-image maxima) and values above it are clipped to it: an image that is
off-distribution everywhere then scores high everywhere. An image score (names: ``msflow.scoring``)
reduces one map to the mean of its ``fraction`` largest values ("max": the largest one); ``official``
is ``mul``/``gmul`` at ``top_k``, the paper's score (spec section 6).

``smoothing`` (ours; 0 = the paper) blurs every map with a Gaussian of that many model-input pixels
(:func:`gaussian_smooth`): a feature vector's likelihood describes a receptive field, not one pixel,
so averaging neighbours removes isolated false peaks and joins a defect's pixels.

An image judged by tiles gets these maps from its stitched per-scale maps (``msflow.data.tiles``): its
references are the whole image's, and a fraction is of ONE model input's area (docs/choices.md, tiles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msflow.scoring import MapSettings, split_score


class AnomalyOutput(NamedTuple):
    scores: Tensor  # (B,) image anomaly scores (higher = more anomalous)
    pixel_map: Tensor  # (B, H, W) the "add" map
    image_map: Tensor  # (B, H, W) the "mul" map, also the map for PRO and for visualisation


def log_likelihood_maps(zs: list[Tensor]) -> list[Tensor]:
    """(B, C_s, H_s, W_s) latents -> (B, H_s, W_s) maps of -0.5 * mean over channels of z^2."""
    return [-0.5 * z.pow(2).mean(dim=1) for z in zs]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True, as the official code) resize of (B, h, w) maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]


def to_original_size(anomaly_map: Tensor, height: int, width: int) -> np.ndarray:
    """One (S, S) map back to its image's (height, width), bilinear, as a float32 numpy array."""
    resized = F.interpolate(
        anomaly_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )
    return resized[0, 0].cpu().numpy()


def _image_max(x: Tensor) -> Tensor:
    return x.flatten(1).max(dim=1).values[:, None, None]


def _fused(logps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """L = sum_s up(logp_s), the log of the product of the scale likelihoods (the global reference too)."""
    return sum(upsample(m, size) for m in logps)


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """(B, H, W) maps blurred by a Gaussian of ``sigma`` pixels; ``sigma`` 0 returns them unchanged.

    Separable, truncated at 4 sigma, borders extended by their edge values (scipy's ``mode="nearest"``):
    every output is a convex combination of inputs, so a map keeps its range (the histograms of
    ``msflow.evaluate.streaming`` rely on it). Plain pad and convolutions, so it exports to ONNX.
    """
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma
    kernel = torch.exp(-0.5 * offsets**2)
    kernel = (kernel / kernel.sum()).to(maps.dtype).to(maps.device)
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))  # along the width
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]  # along the height


def top_k_score(anomaly_map: Tensor, top_k: float | str, area: int | None = None) -> Tensor:
    """Mean of the ``int(area * top_k)`` largest values of each (B, H, W) map (at least one, at most all);
    ``top_k`` "max" (a score name's fraction) takes the largest one.

    ``area`` defaults to H * W. A map stitched from tiles passes the area of one model input instead, so
    that a fraction means the same number of pixels at the same scale however large the image is.
    """
    if top_k == "max":
        return anomaly_map.flatten(1).max(dim=1).values
    pixels = anomaly_map.shape[-1] * anomaly_map.shape[-2]
    k = min(pixels, max(1, int((pixels if area is None else area) * float(top_k))))
    return torch.topk(anomaly_map.flatten(1), k, dim=1).values.mean(dim=1)


def score_map(
    kind: str,
    logps: list[Tensor],
    size: tuple[int, int],
    ref_mul: Tensor | float = 0.0,
    ref_add: Tensor | None = None,
) -> Tensor:
    """The (B, H, W) map of ``kind`` (mul, gmul, add, gadd, logp), the one formula of each (module doc).

    ``ref_mul`` is the global reference of the fused map (gmul), ``ref_add`` the per-scale ones (gadd).
    """
    if kind == "add":
        summed = sum(upsample(torch.exp(m - _image_max(m)), size) for m in logps)
        return _image_max(summed) - summed
    if kind == "gadd":
        assert ref_add is not None, "gadd needs the per-scale global references"
        probs = [torch.exp(torch.clamp(m - r, max=0)) for m, r in zip(logps, ref_add, strict=True)]
        return len(logps) - sum(upsample(p, size) for p in probs)
    fused = _fused(logps, size)
    if kind == "mul":
        return 1 - torch.exp(fused - _image_max(fused))  # = max(P_mul) - P_mul, max(P_mul) = 1
    if kind == "gmul":
        return 1 - torch.exp(torch.clamp(fused - ref_mul, max=0))
    if kind == "logp":
        return -fused
    raise ValueError(f"unknown score map {kind!r}")


def image_score(
    score: str,
    logps: list[Tensor],
    size: tuple[int, int],
    ref_mul: Tensor | float = 0.0,
    area: int | None = None,
    smoothing: float = 0.0,
) -> Tensor:
    """(B,) image scores for a canonical ``KIND:FRACTION[@SIGMA]`` name (``msflow.scoring``).

    ``area``: what the fraction is a fraction of (:func:`top_k_score`); ``smoothing``: the Gaussian sigma
    the map is blurred with before it is reduced (:func:`gaussian_smooth`), unless the name has its own.
    """
    kind, fraction, sigma = split_score(score)
    sigma = smoothing if sigma is None else sigma
    if kind == "scales":  # each scale reduced on its own, then added (a log of a product of maxima)
        return sum(top_k_score(gaussian_smooth(-upsample(m, size), sigma), fraction, area) for m in logps)
    return top_k_score(gaussian_smooth(score_map(kind, logps, size, ref_mul), sigma), fraction, area)


class AnomalyMapper(nn.Module):
    """Turns latents into :class:`AnomalyOutput` maps of ``image_size`` (the model's input); holds the
    global-normalisation references as buffers. An unresolved ``auto`` in ``settings`` (a model before
    training has chosen) means its incumbent (:meth:`MapSettings.resolved`)."""

    def __init__(
        self, num_scales: int, image_size: tuple[int, int], settings: MapSettings | None = None
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.settings = (settings or MapSettings()).resolved()
        self.register_buffer("ref_mul", torch.zeros(()))
        self.register_buffer("ref_add", torch.zeros(num_scales))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    # Read-only views of the settings: a mapper is never re-configured in place (use with_settings).
    @property
    def normalization(self) -> str:
        return self.settings.normalization

    @property
    def smoothing(self) -> float:
        return float(self.settings.smoothing)

    @property
    def score(self) -> str:
        return self.settings.score

    def with_settings(self, settings: MapSettings) -> AnomalyMapper:
        """A mapper with other settings that shares this one's calibrated references."""
        other = AnomalyMapper(len(self.ref_add), self.image_size, settings)
        other.ref_mul, other.ref_add, other.calibrated = self.ref_mul, self.ref_add, self.calibrated
        return other

    @torch.no_grad()
    def calibrate(
        self, logp_batches: Iterable[list[Tensor]], gather: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Set the global references from training images' log-likelihood maps (lists per batch).

        ``gather`` (data-parallel training) concatenates the per-image maxima of every rank's shard in
        image order, so every rank takes the mean over all training images.
        """
        mul_max = [torch.zeros(0, device=self.ref_mul.device)]  # an empty shard contributes nothing
        add_max = [torch.zeros(0, len(self.ref_add), device=self.ref_add.device)]
        for logps in logp_batches:
            mul_max.append(_image_max(_fused(logps, self.image_size)).flatten())
            add_max.append(torch.stack([_image_max(m).flatten() for m in logps], dim=1))
        mul, add = torch.cat(mul_max), torch.cat(add_max)
        if gather is not None:
            mul, add = gather(mul), gather(add)
        self.ref_mul.copy_(mul.mean())
        self.ref_add.copy_(add.mean(dim=0))
        self.calibrated.fill_(True)

    def forward(self, zs: list[Tensor]) -> AnomalyOutput:
        return self.from_log_likelihoods(log_likelihood_maps(zs))

    def from_log_likelihoods(self, logps: list[Tensor], size: tuple[int, int] | None = None) -> AnomalyOutput:
        """The same output from per-scale (B, h_s, w_s) log-likelihood maps.

        ``size``: (H, W) of the output maps, default the model's input size; a tiled image passes its
        stitched maps (``msflow.data.tiles``), already at the size of the whole image.
        """
        size = self.image_size if size is None else (int(size[0]), int(size[1]))
        area = self.image_size[0] * self.image_size[1]  # top-k fractions are of one model input
        image_kind, pixel_kind = ("gmul", "gadd") if self.normalization == "global" else ("mul", "add")
        image_map = gaussian_smooth(score_map(image_kind, logps, size, self.ref_mul), self.smoothing)
        pixel_map = gaussian_smooth(score_map(pixel_kind, logps, size, ref_add=self.ref_add), self.smoothing)
        name = self.settings.score_name()  # "official" is the image map's kind at top_k
        kind, fraction, sigma = split_score(name)
        if kind == image_kind and sigma is None:  # the image map is already there
            scores = top_k_score(image_map, fraction, area)
        else:
            scores = image_score(name, logps, size, self.ref_mul, area, self.smoothing)
        return AnomalyOutput(scores, pixel_map, image_map)
