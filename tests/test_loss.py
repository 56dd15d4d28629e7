"""nll: the unnormalised standard-normal NLL, by hand, and a golden loss from a plain implementation."""

from __future__ import annotations

import math

import pytest
import torch

from msflow.model.fusion_flow import FusionFlow
from msflow.model.loss import nll
from msflow.model.parallel_flow import ParallelFlow

try:
    import plain_flow
    from flow_helpers import perturb_coupling_
except ImportError:  # tests/ became a package
    from . import plain_flow
    from .flow_helpers import perturb_coupling_


def test_nll_of_ones_is_half_the_dimension_minus_log_det() -> None:
    zs = [torch.ones(2, 3, 2, 2), torch.ones(2, 5, 1, 1)]  # 12 + 5 = 17 dims per image
    loss = nll(zs, torch.tensor([0.5, -1.0]))
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([8.5 - 0.5, 8.5 + 1.0]), rtol=0, atol=1e-6)


def test_nll_of_zeros_is_minus_log_det() -> None:
    zs = [torch.zeros(3, 2, 4, 4), torch.zeros(3, 4, 2, 2), torch.zeros(3, 8, 1, 1)]
    log_det = torch.tensor([1.25, 0.0, -7.0])
    torch.testing.assert_close(nll(zs, log_det), -log_det, rtol=0, atol=0)


def test_nll_hand_computed_per_image() -> None:
    # image 0: z1 = (1, 2, 3, 0), z2 = (-2);  0.5 * (1 + 4 + 9 + 0 + 4) = 9,   minus log_det 2  -> 7
    # image 1: z1 = (0, 0, 0, 0.5), z2 = (4);  0.5 * (0.25 + 16) = 8.125,    minus log_det -1 -> 9.125
    z1 = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.5]]).view(2, 1, 2, 2)
    z2 = torch.tensor([-2.0, 4.0]).view(2, 1, 1, 1)
    loss = nll([z1, z2], torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor([7.0, 9.125]), rtol=0, atol=1e-6)
    # no 0.5 log(2 pi) constant and no per-dimension averaging
    assert abs(loss[0].item() - (7.0 + 5 * 0.5 * math.log(2 * math.pi))) > 1


def test_nll_gradient_is_z() -> None:
    z = torch.tensor([[1.5, -2.0]]).view(1, 2, 1, 1).requires_grad_()
    nll([z], torch.zeros(1)).sum().backward()
    torch.testing.assert_close(z.grad, z.detach())


def test_golden_nll_of_a_tiny_flow(float64: None) -> None:
    """The loss of a tiny parallel + fusion flow equals the one a plain NumPy implementation derives.

    ``plain_flow`` recomputes everything from the formulas (positional encoding, couplings, clamps,
    permutations, fusion, NLL) with the modules' parameters as its only input. The golden numbers are
    what it printed (float64; the parameters come from torch's default initialisers under
    ``manual_seed(1234)``, so a torch release that changes those would move them).
    """
    torch.manual_seed(1234)
    generator = torch.Generator().manual_seed(0)
    channels, sizes, blocks = [4, 12, 8], [4, 2, 1], [1, 2, 1]
    flows = [
        ParallelFlow(c, n, s, s, cond_channels=4, generator=generator)
        for c, s, n in zip(channels, sizes, blocks, strict=True)
    ]
    fusion = FusionFlow(channels, generator=generator)
    for flow in flows:
        for block in flow.blocks:
            perturb_coupling_(block)
    # A fixed input that does not depend on the RNG: sin of a ramp, two images.
    xs = []
    start = 0
    for c, s in zip(channels, sizes, strict=True):
        n = 2 * c * s * s
        xs.append(torch.sin(0.37 * torch.arange(start, start + n)).reshape(2, c, s, s))
        start += n
    with torch.no_grad():
        zs, log_det = [], torch.zeros(2)
        for flow, x in zip(flows, xs, strict=True):
            z, ld = flow(x)
            zs.append(z)
            log_det = log_det + ld
        zs, ld_fusion = fusion(zs)
        loss = nll(zs, log_det + ld_fusion)
    plain = []
    for image in range(2):
        zs_plain, ld_plain = [], 0.0
        for flow, x in zip(flows, xs, strict=True):
            x = x[image].numpy()
            cond = plain_flow.positional_encoding(4, *x.shape[1:])
            for block in flow.blocks:
                params = {k: v.numpy() for k, v in block.state_dict().items()}
                x, ld = plain_flow.coupling(x, cond, params, alpha=1.9, eps=block.subnet[1].eps)
                ld_plain += ld
            zs_plain.append(x)
        params = {k: v.numpy() for k, v in fusion.state_dict().items()}
        zs_plain, ld = plain_flow.fusion(zs_plain, params, alpha=1.9, eps=fusion.subnet_v_to_u.mixer[1].eps)
        plain.append(plain_flow.nll(zs_plain, ld_plain + ld))
    golden = [72.86813361663361, 60.78893407814681]  # printed by the plain implementation
    assert plain == pytest.approx(golden, rel=1e-12)
    torch.testing.assert_close(loss, torch.tensor(plain), rtol=1e-10, atol=1e-10)
