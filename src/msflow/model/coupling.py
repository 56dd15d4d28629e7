"""The affine coupling block of MSFlow's parallel flows (FrEIA ``AllInOneBlock`` semantics, owned here).

For x of shape (B, C, H, W), a condition c of shape (B, D, H, W), passive half x1 (the first ceil(C/2)
channels) and active half x2 (the last floor(C/2)):

    (s, t) = 0.1 * g([x1, c])                 g = conv3x3 -> channel LayerNorm -> ReLU -> conv3x3
    l      = clamp(s)                          "freia02": 1.9 tanh(s);  "freia_new": 1.9 tanh(s / 1.9)
    y      = [x1, x2 * exp(l) + t]
    y      = y * gamma + beta                  gamma = 0.1 softplus_{beta=0.5}(g_hat), identity at init
    y      = y[:, perm]                        a fixed random channel permutation (a buffer)
    log|det J| = sum_{c,h,w} l + H W sum_c log(gamma_c)

FrEIA 0.2 is what the official code ran; its ``rev=True`` flag becomes
``forward``/``inverse`` here and the permutation is an index buffer, not a one-hot parameter.

References: Dinh et al., "Density estimation using Real NVP", https://arxiv.org/abs/1605.08803;
Kingma & Dhariwal, "Glow", https://arxiv.org/abs/1807.03039.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msflow.model.layout import permute_channels

CLAMPS = ("freia02", "freia_new")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_ln_subnet(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """MSFlow's ``subnet_conv_ln`` (in both flows): conv3x3 -> channel LayerNorm -> ReLU -> conv3x3."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        ChannelLayerNorm(mid_channels),
        nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, 3, padding=1),
    )


class AffineCouplingBlock(nn.Module):
    """Conditional affine coupling + soft clamp + global affine + fixed permutation (see module doc).

    C = ``channels``, D = ``cond_channels``; ``clamp`` is ``"freia02"`` (the formula MSFlow ran) or
    ``"freia_new"`` (FrEIA after Aug 2023); ``generator`` draws the permutation (reproducible models).
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int = 64,
        clamp_alpha: float = 1.9,
        clamp: str = "freia02",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got '{clamp}'")
        self.passive = channels - channels // 2
        self.active = channels // 2
        self.clamp_alpha, self.clamp = clamp_alpha, clamp
        width = self.passive + cond_channels
        self.subnet = conv_ln_subnet(width, width, 2 * self.active)
        # softplus_{beta=0.5}(g) * 0.1 = 0.2 ln(1 + e^{g/2}) equals 1 at g = 2 ln(e^5 - 1).
        self.global_scale_raw = nn.Parameter(torch.full((1, channels, 1, 1), 2 * math.log(math.exp(5) - 1)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inverse", torch.argsort(perm))

    def _subnet(self, x1: Tensor, cond: Tensor) -> Tensor:
        """g([x1, cond]) with the first conv split by input channels (exact: convolution is linear).

        The condition's share is computed for a (1, D, H, W) ``cond`` and broadcast over the batch, so
        its weight gradient costs one image instead of B: about half a block where the condition
        dominates the input (EfficientNet-Lite0: 64 of 76 channels at scale 1).
        """
        conv = self.subnet[0]
        h = F.conv2d(x1, conv.weight[:, : self.passive], conv.bias, padding=1)
        h = h + self._cond_term(cond)
        for layer in list(self.subnet)[1:]:  # LayerNorm -> ReLU -> conv
            h = layer(h)
        return h

    def _cond_term(self, cond: Tensor) -> Tensor:
        """The condition's share of the first conv; kept between calls while nothing can change it.

        Without autograd and autocast (inference) it depends only on the weight and the condition: it is
        reused until the weight is updated in place (its version counter moves) or moved, or another
        condition comes, saving a batch-1 convolution (one thread whatever the thread count) per block.
        """
        weight = self.subnet[0].weight
        if torch.is_grad_enabled() or torch.is_autocast_enabled(cond.device.type) or cond.is_inference():
            return F.conv2d(cond, weight[:, self.passive :], None, padding=1)
        # The cache holds ``cond`` itself, so an identity test cannot be fooled by a reused address.
        key = (weight._version, weight.data_ptr(), weight.dtype, cond._version)
        cache = getattr(self, "_cond_cache", None)
        if cache is None or cache[0] is not cond or cache[1] != key:
            cache = self._cond_cache = (cond, key, F.conv2d(cond, weight[:, self.passive :], None, padding=1))
        return cache[2]

    def _log_scale_and_shift(self, x1: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.1 * self._subnet(x1, cond)
        s, t = a[:, : self.active], a[:, self.active :]
        return self.clamp_alpha * torch.tanh(s / self.clamp_alpha if self.clamp == "freia_new" else s), t

    def global_scale(self) -> Tensor:
        """The per-channel factor gamma of the block's global affine step (1 at initialisation)."""
        return 0.1 * F.softplus(self.global_scale_raw, beta=0.5)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W), cond (B or 1, D, H, W) -> y (B, C, H, W), log_det (B,)."""
        x1, x2 = x[:, : self.passive], x[:, self.passive :]
        log_scale, shift = self._log_scale_and_shift(x1, cond)
        y = torch.cat([x1, x2 * torch.exp(log_scale) + shift], dim=1)
        gamma = self.global_scale()
        y = permute_channels(y * gamma + self.global_offset, self.perm)
        return y, log_scale.sum(dim=(1, 2, 3)) + x.shape[2] * x.shape[3] * torch.log(gamma).sum()

    def inverse(self, y: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Exact inverse of ``forward``; returns x and the inverse log-det (= -forward log-det)."""
        gamma = self.global_scale()
        y = (permute_channels(y, self.perm_inverse) - self.global_offset) / gamma
        y1, y2 = y[:, : self.passive], y[:, self.passive :]
        log_scale, shift = self._log_scale_and_shift(y1, cond)
        x = torch.cat([y1, (y2 - shift) * torch.exp(-log_scale)], dim=1)
        return x, -log_scale.sum(dim=(1, 2, 3)) - y.shape[2] * y.shape[3] * torch.log(gamma).sum()
