"""FusionFlow: per-scale permutations + the two-step cross-scale coupling (B12)."""

from __future__ import annotations

import pytest
import torch

from msflow.model.fusion_flow import FusionFlow

try:
    from flow_helpers import assert_log_det_matches, brute_force_log_det_multi, perturb_all_
except ImportError:  # tests/ became a package
    from .flow_helpers import assert_log_det_matches, brute_force_log_det_multi, perturb_all_


# The design-guide appendix toy, and a wider one: with half-widths summing to 12 the mixer's middle
# layer has 3 channels, so its channel LayerNorm carries information (over 1 or 2 channels a LayerNorm
# output is constant or +-1, which would hide the cross-scale path from the Jacobian).
CONFIGS = [([2, 4, 2], [4, 2, 1]), ([4, 12, 8], [4, 2, 1])]


def make_fusion(channels: list[int]) -> FusionFlow:
    fusion = FusionFlow(channels, generator=torch.Generator().manual_seed(2))
    perturb_all_(fusion)
    return fusion


def sample(channels: list[int], sizes: list[int], batch: int) -> list[torch.Tensor]:
    return [torch.randn(batch, c, s, s) for c, s in zip(channels, sizes, strict=True)]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(("channels", "sizes"), [*CONFIGS, ([4, 12, 8], [8, 4, 2])])
def test_fusion_flow_is_exactly_invertible(channels: list[int], sizes: list[int]) -> None:
    fusion = make_fusion(channels)
    xs = sample(channels, sizes, 3)
    zs, log_det = fusion(xs)
    xs_rec, log_det_inv = fusion.inverse(zs)
    assert [z.shape for z in zs] == [x.shape for x in xs] and log_det.shape == (3,)
    for x, x_rec in zip(xs, xs_rec, strict=True):
        torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-11)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(3), rtol=0, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_fusion_inverse_log_det_is_the_negative_of_forward() -> None:
    # Spec B12: the official layer returned the forward-sign log-det in reverse mode.
    fusion = make_fusion([4, 12, 8])
    xs = sample([4, 12, 8], [4, 2, 1], 2)
    zs, log_det = fusion(xs)
    _, log_det_inv = fusion.inverse(zs)
    assert (log_det.abs() > 0.1).all()
    torch.testing.assert_close(log_det_inv, -log_det, rtol=0, atol=1e-11)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(("channels", "sizes"), CONFIGS)
def test_fusion_log_det_matches_autograd_jacobian(channels: list[int], sizes: list[int]) -> None:
    fusion = make_fusion(channels)
    xs = [x[0] for x in sample(channels, sizes, 1)]
    _, log_det = fusion([x[None] for x in xs])
    reference = brute_force_log_det_multi(lambda parts: fusion(parts)[0], xs)
    assert abs(float(reference)) > 0.1
    assert_log_det_matches(log_det[0], reference)
    with pytest.raises(AssertionError):  # the same check rejects a log-det off by 1e-3
        assert_log_det_matches(log_det[0] + 1e-3, reference)


@pytest.mark.usefixtures("float64")
def test_fusion_inverse_log_det_matches_autograd_jacobian() -> None:
    channels, sizes = CONFIGS[1]
    fusion = make_fusion(channels)
    zs = [z[0] for z in sample(channels, sizes, 1)]
    _, log_det = fusion.inverse([z[None] for z in zs])
    assert_log_det_matches(log_det[0], brute_force_log_det_multi(lambda parts: fusion.inverse(parts)[0], zs))


@pytest.mark.usefixtures("float64")
def test_scales_exchange_information() -> None:
    fusion = make_fusion([4, 12, 8])
    xs = sample([4, 12, 8], [4, 2, 1], 1)
    changed = [xs[0], xs[1], xs[2] + 1.0]  # only the coarsest scale moves
    zs, _ = fusion(xs)
    zs_changed, _ = fusion(changed)
    assert not torch.allclose(zs[0], zs_changed[0])  # ... and the finest scale's output follows


def test_permutations_are_buffers() -> None:
    fusion = FusionFlow([4, 6, 2], generator=torch.Generator().manual_seed(0))
    buffers = dict(fusion.named_buffers())
    for level, c in enumerate([4, 6, 2]):
        perm = buffers[f"permutations.{level}.perm"]
        assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(c))
        assert torch.equal(perm[buffers[f"permutations.{level}.perm_inverse"]], torch.arange(c))
        assert f"permutations.{level}.perm" in fusion.state_dict()
        x = torch.randn(2, c, 3, 3)
        permutation = fusion.permutations[level]
        assert torch.equal(permutation(x), x[:, perm]) and torch.equal(permutation.inverse(permutation(x)), x)
    assert not any("perm" in name for name, _ in fusion.named_parameters())


def test_odd_channel_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        FusionFlow([4, 5, 2])
