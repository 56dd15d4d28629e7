"""MSFlow wired together: frozen backbone -> feature standardisation -> parallel flows -> fusion flow.

    images (B, 3, H, W) in [0, 1]   (square H = W = S in the paper; any multiples of 32 here)
      -> backbone + 3x3/2 pool     feats_l  (B, C_l, H/8, W/8), (B, C_l, H/16, W/16), (B, C_l, H/32, W/32)
      -> (x - mean_c) / std_c       a fixed affine map per channel, identity unless standardising
      -> ParallelFlow_l             z'_l, log_det_l
      -> FusionFlow                 z_l, log_det_f
    FlowOutput(zs, log_det = sum_l log_det_l + log_det_f)

The standardisation is fixed (fitted once on training features, then frozen), so the density the
flows learn is the official one up to a constant Jacobian. It keeps EfficientNet-Lite0's large,
un-activated stage outputs from saturating the maps (see ``ModelConfig.feature_norm``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from msflow.config import ModelConfig
from msflow.model.anomaly_map import AnomalyMapper, AnomalyOutput, log_likelihood_maps
from msflow.model.backbone import FeatureExtractor
from msflow.model.fusion_flow import FusionFlow
from msflow.model.layout import Layout, to_layout
from msflow.model.parallel_flow import ParallelFlow
from msflow.scoring import MapSettings


class FlowOutput(NamedTuple):
    zs: list[Tensor]  # one (B, C_l, H_l, W_l) latent per scale
    log_det: Tensor  # (B,) total log|det J|


class ChannelStandardization(nn.Module):
    """One scale's fixed per-channel affine map ``(x - mean) / std`` (identity until fitted)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MSFlow(nn.Module):
    """The MSFlow model of a ``ModelConfig``: Zhou et al., "MSFlow: Multi-Scale Flow-based Framework for
    Unsupervised Anomaly Detection", IEEE TNNLS 2024, https://arxiv.org/abs/2308.15300."""

    def __init__(self, config: ModelConfig, backbone: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone or FeatureExtractor(
            config.backbone, config.pretrained, config.weights, config.reflect_padding, config.pool
        )
        self.feature_shapes = self.backbone.feature_shapes(config.size)
        channels = [c for c, _, _ in self.feature_shapes]
        generator = torch.Generator().manual_seed(config.seed)  # reproducible permutations
        self.parallel_flows = nn.ModuleList(
            ParallelFlow(c, n, h, w, config.cond_channels, config.clamp_alpha, config.clamp, generator)
            for (c, h, w), n in zip(self.feature_shapes, config.num_blocks, strict=True)
        )
        self.fusion_flow = FusionFlow(channels, config.clamp_alpha, generator)
        self.standardizers = nn.ModuleList(ChannelStandardization(c) for c in channels)
        self.anomaly = AnomalyMapper(len(channels), config.size, config.maps)
        # How the flows lay out their tensors: "auto" = channels-last on oneDNN CPUs (model/layout.py),
        # "contiguous" = plain NCHW. Not part of the config: it changes speed, not the model.
        self.flow_layout: Layout = "auto"

    # -- features ------------------------------------------------------------------------------
    def extract(self, images: Tensor) -> list[Tensor]:
        """Raw pooled backbone features (no autograd): the part that is cached for training."""
        return self.backbone(images)

    def standardize(self, feats: list[Tensor]) -> list[Tensor]:
        """Apply the fixed per-channel standardisation (identity when not fitted or not enabled)."""
        return [standardize(f) for standardize, f in zip(self.standardizers, feats, strict=True)]

    @torch.no_grad()
    def fit_standardization(
        self,
        feature_batches: Iterable[list[Tensor]],
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        """Fit per-channel mean/std on training features (float64 sums); no-op unless enabled.

        ``reduce`` adds up the sums of every rank's shard in data-parallel training (an empty shard
        contributes zeros), so all ranks get the statistics of all images.
        """
        if not self.config.standardize_features:
            return
        sums: list[Tensor] | None = None
        for feats in feature_batches:
            stats = []  # per scale: the (3, C) sums of x, of x^2 and the count of values per channel
            for f in (f.double() for f in feats):
                count = torch.full_like(f[0, :, 0, 0], f.numel() / f.shape[1])
                stats.append(torch.stack([f.sum((0, 2, 3)), f.pow(2).sum((0, 2, 3)), count]))
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats, strict=True)]
        if reduce is not None:
            if sums is None:
                sums = [torch.zeros(3, c, dtype=torch.float64) for c, _, _ in self.feature_shapes]
            sums = reduce(sums)
        if sums is None:
            raise ValueError("fit_standardization needs at least one batch of features")
        for standardizer, (s, sq, n) in zip(self.standardizers, sums, strict=True):
            mean = s / n
            std = (sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
            standardizer.mean.copy_(mean.view(1, -1, 1, 1))
            standardizer.std.copy_(std.view(1, -1, 1, 1))

    # -- flows -----------------------------------------------------------------------------------
    def flow(self, feats: list[Tensor]) -> FlowOutput:
        """Standardised features -> latents and total log-det (the trainable part)."""
        feats = to_layout(feats, self.flow_layout)
        zs, log_det = [], feats[0].new_zeros(feats[0].shape[0])
        for flow, f in zip(self.parallel_flows, feats, strict=True):
            z, ld = flow(f)
            zs.append(z)
            log_det = log_det + ld
        zs, ld_fusion = self.fusion_flow(zs)
        return FlowOutput(zs, log_det + ld_fusion)

    def flow_inverse(self, zs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Exact inverse of :meth:`flow`: latents -> standardised features, inverse log-det."""
        zs = to_layout(zs, self.flow_layout)
        xs, log_det = self.fusion_flow.inverse(zs)
        feats = []
        for flow, x in zip(self.parallel_flows, xs, strict=True):
            f, ld = flow.inverse(x)
            feats.append(f)
            log_det = log_det + ld
        return feats, log_det

    def forward(self, images: Tensor) -> FlowOutput:
        """(B, 3, H, W) RGB in [0, 1] -> FlowOutput."""
        return self.flow(self.standardize(self.extract(images)))

    def predict(self, images: Tensor) -> AnomalyOutput:
        """(B, 3, H, W) RGB in [0, 1] -> image scores and (B, H, W) pixel and image maps."""
        return self.anomaly(self.forward(images).zs)

    @torch.no_grad()
    def calibrate_global_normalization(
        self, feature_batches: Iterable[list[Tensor]], gather: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Set the "global" normalisation references from standardised training features (``gather``:
        every rank's per-image maxima in data-parallel training, :meth:`AnomalyMapper.calibrate`)."""
        self.anomaly.calibrate((log_likelihood_maps(self.flow(f).zs) for f in feature_batches), gather)

    def with_settings(self, settings: MapSettings) -> MSFlow:
        """The same trained model (flows, backbone and references shared, nothing copied) with other
        map and score settings; this model is left as it is."""
        other = copy.copy(self)
        other.__dict__["_modules"] = dict(self._modules)  # its own module table: a new mapper
        other.anomaly = self.anomaly.with_settings(settings)
        other.config = self.config.with_maps(settings)
        return other

    # -- bookkeeping -----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of each part (the backbone has none)."""

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad)

        counts = {f"parallel_flow_{i + 1}": count(f) for i, f in enumerate(self.parallel_flows)}
        counts["fusion_flow"] = count(self.fusion_flow)
        counts["backbone"] = count(self.backbone)
        counts["total"] = sum(counts.values())
        return counts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
