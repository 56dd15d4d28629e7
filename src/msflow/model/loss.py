"""The training loss: MSFlow's unnormalised negative log-likelihood (no 2 pi constant, as official)."""

from __future__ import annotations

from torch import Tensor


def nll(zs: list[Tensor], log_det: Tensor) -> Tensor:
    """(B,) negative log-likelihoods of the latents under a standard normal, without 0.5 log(2 pi):

        L_b = sum_s 0.5 * ||z_s||^2 - log_det       (sum over C_s * H_s * W_s, no per-dim averaging)

    Training minimises their mean, as the official code (gradient clipping at norm 2 interacts with this
    scale, so it is kept for parity).
    """
    # Summed over (C, H, W) rather than flattened: flattening a channels-last z would copy it.
    return sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) for z in zs) - log_det
