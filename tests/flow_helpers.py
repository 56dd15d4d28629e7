"""Helpers shared by the flow tests: brute-force log-dets, parameter perturbation.

The log-det checks follow the design guide (section 3, items 2 and 3): the full autograd Jacobian of
ONE sample, flattened to n x n, and ``slogdet``; never finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# float64 autograd Jacobians agree with analytic log-dets to ~1e-13; 1e-9 leaves room but still
# rejects a 1e-3 error (see the "has teeth" tests).
LOG_DET_ATOL = 1e-9


def brute_force_log_det(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log|det J_f(x)| for ONE sample x (no batch dim); f maps a (1, *x.shape) batch to a batch."""
    jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0)).squeeze(0), x, vectorize=True)
    n = x.numel()
    return torch.linalg.slogdet(jac.reshape(n, n)).logabsdet


def brute_force_log_det_multi(f: Callable[[list[Tensor]], list[Tensor]], xs: Sequence[Tensor]) -> Tensor:
    """Same for a map from a list of scales to a list of scales: the scales are concatenated into one
    flat vector (design guide, Appendix A). ``xs`` are single samples without the batch dim."""
    numels = [x.numel() for x in xs]

    def flat(v: Tensor) -> Tensor:
        parts = [p.reshape(1, *x.shape) for p, x in zip(v.split(numels), xs, strict=True)]
        return torch.cat([y.reshape(-1) for y in f(parts)])

    jac = torch.autograd.functional.jacobian(flat, torch.cat([x.reshape(-1) for x in xs]), vectorize=True)
    return torch.linalg.slogdet(jac).logabsdet


def assert_log_det_matches(log_det: Tensor, reference: Tensor) -> None:
    torch.testing.assert_close(log_det, reference, rtol=0, atol=LOG_DET_ATOL)


@torch.no_grad()
def perturb_coupling_(block: nn.Module, scale: float = 0.3) -> None:
    """Move an AffineCouplingBlock away from its init: global affine and last subnet conv get noise,
    so gamma != 1, beta != 0 and the log-scales are not tiny."""
    block.global_offset.add_(scale * torch.randn_like(block.global_offset))
    block.global_scale_raw.add_(3 * scale * torch.randn_like(block.global_scale_raw))
    last = block.subnet[-1]
    last.weight.add_(scale * torch.randn_like(last.weight))
    last.bias.add_(scale * torch.randn_like(last.bias))


@torch.no_grad()
def perturb_all_(module: nn.Module, scale: float = 0.3) -> None:
    """Add Gaussian noise to every parameter (used for the fusion flow)."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))
