"""One scale's parallel flow: a stack of conditional coupling blocks (2, 5 or 8 in MSFlow).

Every block of the stack is conditioned on the same 2-D sin/cos positional encoding (CFlow style),
built once for the scale's H x W and kept as a buffer (the official code rebuilt it on the CPU at
every batch: docs/official-code-differences.md, B10).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from msflow.model.coupling import AffineCouplingBlock


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """(D, H, W) encoding: sin/cos of the column index in the first D/2 channels, of the row in the rest.

    With D' = D/2 and frequencies w_k = 10000^(-2k/D'), k = 0..D'/2-1, channel 2k holds sin(w_k x),
    channel 2k+1 cos(w_k x) (x = column 0..W-1), and channels D'+2k, D'+2k+1 the same for the row y.
    """
    if channels % 4:
        raise ValueError(f"positional-encoding channels must be divisible by 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    xs = torch.arange(width, dtype=torch.float64)[:, None] * freq  # (W, D'/2)
    ys = torch.arange(height, dtype=torch.float64)[:, None] * freq  # (H, D'/2)
    enc = torch.zeros(channels, height, width, dtype=torch.float64)
    enc[0:half:2] = torch.sin(xs).T[:, None, :]  # broadcast over the rows
    enc[1:half:2] = torch.cos(xs).T[:, None, :]
    enc[half::2] = torch.sin(ys).T[:, :, None]  # broadcast over the columns
    enc[half + 1 :: 2] = torch.cos(ys).T[:, :, None]
    return enc.to(torch.get_default_dtype())


class ParallelFlow(nn.Module):
    """``num_blocks`` :class:`AffineCouplingBlock` on one scale's ``height`` x ``width`` map, each
    conditioned on the encoding of ``cond_channels`` (64 in MSFlow) built for that size."""

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        height: int,
        width: int,
        cond_channels: int = 64,
        clamp_alpha: float = 1.9,
        clamp: str = "freia02",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AffineCouplingBlock(channels, cond_channels, clamp_alpha, clamp, generator)
            for _ in range(num_blocks)
        )
        self.register_buffer(
            "cond", positional_encoding_2d(cond_channels, height, width)[None], persistent=False
        )

    def _cond(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != self.cond.shape[-2:]:
            raise ValueError(
                f"feature map {tuple(x.shape[-2:])} does not match the flow's {tuple(self.cond.shape[-2:])}"
            )
        return self.cond.to(x.dtype)  # (1, D, H, W): blocks broadcast it over the batch

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> z (B, C, H, W), log_det (B,)."""
        cond = self._cond(x)
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Exact inverse: z -> x, with the inverse log-det (= -forward log-det)."""
        cond = self._cond(z)
        log_det = z.new_zeros(z.shape[0])
        for block in reversed(self.blocks):
            z, ld = block.inverse(z, cond)
            log_det = log_det + ld
        return z, log_det
