"""MSFlow's fusion flow: a fixed channel permutation per scale, then one cross-scale coupling layer.

With z_s split into halves u_s (first C_s/2 channels) and v_s (last C_s/2), as the official code computes it:

    step A:  (sigma_s, tau_s)   = F2({v_s})      u'_s = exp(k(sigma_s)) * u_s + tau_s
    step B:  (sigma'_s, tau'_s) = F1({u'_s})     v'_s = exp(k(sigma'_s)) * v_s + tau'_s
    k(x) = alpha * 0.636 * atan(x / alpha)       (CS-Flow's soft clamp, alpha = 1.9)
    log|det J| = sum_s [ sum k(sigma_s) + sum k(sigma'_s) ]

Each F mixes the scales: pool every input to the coarsest grid, concatenate, conv3x3 -> channel LN ->
ReLU -> conv3x3 -> ReLU, split, bilinear up-sample (align_corners=True), residual add, then per-scale
conv3x3 heads give sigma and tau.

Fixed here (docs/official-code-differences.md, B12): the inverse returns the negated log-det, and the
outputs are not clipped to +-1e6 (a clip would make the layer non-invertible at the extremes; the soft
clamp already bounds scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msflow.model.coupling import conv_ln_subnet
from msflow.model.layout import permute_channels

ATAN_FACTOR = 0.636  # the official constant, ~2/pi, so that k maps onto (-alpha, alpha)


def _adaptive_pool_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) averaging matrix of adaptive average pooling along one axis.

    Row i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1, exactly the
    windows of ``F.adaptive_avg_pool2d``, which ONNX cannot export when n_out does not divide n_in.
    """
    m = torch.zeros(n_out, n_in, dtype=like.dtype, device=like.device)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool x to ``size``; a plain strided pool when it divides evenly (ONNX-friendly).

    Grids that do not divide (inputs whose sides are multiples of 16 but not of 32, e.g. 208 x 512)
    use adaptive pooling written as two small matrix products, which export to ONNX as MatMuls.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])  # Python ints: a constant kernel when traced for ONNX
    if (h, w) == tuple(size):
        return x
    if h % size[0] == 0 and w % size[1] == 0:
        return F.avg_pool2d(x, (h // size[0], w // size[1]))
    rows, cols = _adaptive_pool_matrix(h, size[0], x), _adaptive_pool_matrix(w, size[1], x)
    return torch.matmul(torch.matmul(rows, x), cols.T)


class FusionSubnet(nn.Module):
    """Cross-scale mixer plus per-scale heads: (sigma_s, tau_s) for each scale of half-width c_s."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        total = sum(channels)
        self.mixer = nn.Sequential(
            *conv_ln_subnet(total, total // 4, total),  # S -> S/4 -> S (official: mid_channels ignored, B13)
            nn.ReLU(),  # the cross-scale message is non-negative, as in the official code
        )
        self.sigma_heads = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in channels)
        self.tau_heads = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in channels)

    def forward(self, xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        coarse = min(((int(x.shape[-2]), int(x.shape[-1])) for x in xs), key=lambda s: s[0] * s[1])
        mixed = self.mixer(torch.cat([pool_to(x, coarse) for x in xs], dim=1))  # (B, S, h, w)
        out = []
        for x, message, sigma_head, tau_head in zip(
            xs, mixed.split(self.channels, dim=1), self.sigma_heads, self.tau_heads, strict=True
        ):
            r = x + F.interpolate(message, size=x.shape[-2:], mode="bilinear", align_corners=True)
            out.append((sigma_head(r), tau_head(r)))
        return out


class ChannelPermutation(nn.Module):
    """A fixed random channel order; ``perm`` and its inverse are buffers, so they are saved."""

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inverse", torch.argsort(perm))

    def forward(self, x: Tensor) -> Tensor:
        return permute_channels(x, self.perm)

    def inverse(self, x: Tensor) -> Tensor:
        return permute_channels(x, self.perm_inverse)


class FusionFlow(nn.Module):
    """Fixed per-scale permutations followed by the two-step fusion coupling (see module doc).

    ``channels`` are the C_s of the scales (each even); ``generator`` draws the permutations.
    """

    def __init__(
        self, channels: list[int], clamp_alpha: float = 1.9, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        for c in channels:
            if c % 2:
                raise ValueError(f"fusion flow needs an even channel count per scale, got {c}")
        self.halves = [c // 2 for c in channels]
        self.clamp_alpha = clamp_alpha
        self.subnet_v_to_u = FusionSubnet(self.halves)  # reads v, moves u (step A)
        self.subnet_u_to_v = FusionSubnet(self.halves)  # reads u', moves v (step B)
        self.permutations = nn.ModuleList(ChannelPermutation(c, generator) for c in channels)

    def _split(self, xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Each scale's halves: u_s (its first C_s/2 channels) and v_s (the last C_s/2)."""
        us = [x[:, :h] for x, h in zip(xs, self.halves, strict=True)]
        return us, [x[:, h:] for x, h in zip(xs, self.halves, strict=True)]

    def _step(
        self, subnet: FusionSubnet, reads: list[Tensor], moves: list[Tensor], log_det: Tensor, inverse: bool
    ) -> tuple[list[Tensor], Tensor]:
        """One coupling step: ``moves`` scaled by exp(k(sigma)) and shifted by tau, both read by ``subnet``
        from ``reads`` (inverse: the shift undone, then the scale), and the log-det updated by +-sum k."""
        out = []
        for x, (sigma, tau) in zip(moves, subnet(reads), strict=True):
            k = self.clamp_alpha * ATAN_FACTOR * torch.atan(sigma / self.clamp_alpha)
            if inverse:
                out.append((x - tau) * torch.exp(-k))
                log_det = log_det - k.sum(dim=(1, 2, 3))
            else:
                out.append(torch.exp(k) * x + tau)
                log_det = log_det + k.sum(dim=(1, 2, 3))
        return out, log_det

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Three (B, C_s, H_s, W_s) tensors -> three tensors of the same shapes, log_det (B,)."""
        xs = [permute(x) for permute, x in zip(self.permutations, xs, strict=True)]
        us, vs = self._split(xs)
        log_det = xs[0].new_zeros(xs[0].shape[0])
        us, log_det = self._step(self.subnet_v_to_u, vs, us, log_det, inverse=False)  # step A
        vs, log_det = self._step(self.subnet_u_to_v, us, vs, log_det, inverse=False)  # step B
        return [torch.cat([u, v], dim=1) for u, v in zip(us, vs, strict=True)], log_det

    def inverse(self, zs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Exact inverse (solve v from u' first, then u); the log-det is the negated forward one."""
        us, vs = self._split(zs)
        log_det = zs[0].new_zeros(zs[0].shape[0])
        vs, log_det = self._step(self.subnet_u_to_v, us, vs, log_det, inverse=True)
        us, log_det = self._step(self.subnet_v_to_u, vs, us, log_det, inverse=True)
        xs = [torch.cat([u, v], dim=1) for u, v in zip(us, vs, strict=True)]
        return [permute.inverse(x) for permute, x in zip(self.permutations, xs, strict=True)], log_det
