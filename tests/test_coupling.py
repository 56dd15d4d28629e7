"""AffineCouplingBlock: exact inverse, log-det against the autograd Jacobian, structure."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from msflow.model.coupling import AffineCouplingBlock
from msflow.model.parallel_flow import positional_encoding_2d

try:
    from flow_helpers import assert_log_det_matches, brute_force_log_det, perturb_coupling_
except ImportError:  # tests/ became a package
    from .flow_helpers import assert_log_det_matches, brute_force_log_det, perturb_coupling_


COND = 4  # condition channels at toy size
CLAMPS = ["freia02", "freia_new"]
CHANNELS = [4, 5]  # even and odd: the passive half is ceil(C/2)


def make_block(channels: int, clamp: str = "freia02", seed: int = 0) -> AffineCouplingBlock:
    block = AffineCouplingBlock(channels, COND, clamp=clamp, generator=torch.Generator().manual_seed(seed))
    perturb_coupling_(block)
    return block


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_block_is_exactly_invertible(channels: int, clamp: str) -> None:
    block = make_block(channels, clamp)
    x, cond = torch.randn(3, channels, 5, 4), torch.randn(3, COND, 5, 4)
    y, log_det = block(x, cond)
    x_rec, log_det_inv = block.inverse(y, cond)
    assert y.shape == x.shape and log_det.shape == (3,)
    assert not torch.allclose(y, x)  # the map is not the identity
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(3), rtol=0, atol=1e-12)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_block_log_det_matches_autograd_jacobian(channels: int, clamp: str) -> None:
    block = make_block(channels, clamp)
    x, cond = torch.randn(channels, 3, 3), torch.randn(1, COND, 3, 3)  # n = 36 or 45
    _, log_det = block(x[None], cond)
    reference = brute_force_log_det(lambda v: block(v, cond)[0], x)
    assert abs(float(reference)) > 0.1  # not a near-identity map
    assert_log_det_matches(log_det[0], reference)


@pytest.mark.usefixtures("float64")
def test_log_det_check_rejects_a_log_det_off_by_1e3() -> None:
    block = make_block(4)
    x, cond = torch.randn(4, 3, 3), torch.randn(1, COND, 3, 3)
    _, log_det = block(x[None], cond)
    reference = brute_force_log_det(lambda v: block(v, cond)[0], x)
    assert_log_det_matches(log_det[0], reference)
    with pytest.raises(AssertionError):
        assert_log_det_matches(log_det[0] + 1e-3, reference)


@pytest.mark.usefixtures("float64")
def test_inverse_log_det_check_rejects_a_wrong_sign() -> None:
    block = make_block(4)
    y, cond = torch.randn(4, 3, 3), torch.randn(1, COND, 3, 3)
    _, log_det_inv = block.inverse(y[None], cond)
    reference = brute_force_log_det(lambda v: block.inverse(v, cond)[0], y)
    assert_log_det_matches(log_det_inv[0], reference)
    with pytest.raises(AssertionError):
        assert_log_det_matches(-log_det_inv[0], reference)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("channels", CHANNELS)
def test_passive_half_is_bit_identical(channels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    block = make_block(channels)
    passive = channels - channels // 2
    x, cond = torch.randn(2, channels, 3, 3), torch.randn(2, COND, 3, 3)

    # 1) With the global affine made the exact identity (gamma = 1, beta = 0: multiplying by 1.0 and
    #    adding 0.0 are exact), undoing the permutation gives back x1 bit for bit.
    with torch.no_grad():
        block.global_offset.zero_()
    monkeypatch.setattr(block, "global_scale", lambda: torch.ones(1, channels, 1, 1))
    y, _ = block(x, cond)
    unpermuted = y[:, block.perm_inverse]
    assert torch.equal(unpermuted[:, :passive], x[:, :passive])
    assert not torch.allclose(unpermuted[:, passive:], x[:, passive:])  # the active half moved
    monkeypatch.undo()

    # 2) With the (perturbed) global affine on: the passive outputs do not depend on the active half.
    x_other = x.clone()
    x_other[:, passive:] = torch.randn(2, channels - passive, 3, 3)
    y1, _ = block(x, cond)
    y2, _ = block(x_other, cond)
    assert torch.equal(y1[:, block.perm_inverse][:, :passive], y2[:, block.perm_inverse][:, :passive])
    assert not torch.equal(y1, y2)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("clamp", "log_scale"),
    [
        ("freia02", lambda s: 1.9 * math.tanh(0.1 * s)),  # what MSFlow ran (FrEIA 0.2)
        ("freia_new", lambda s: 1.9 * math.tanh(0.1 * s / 1.9)),  # FrEIA after Aug 2023
    ],
)
def test_soft_clamp_formula(clamp: str, log_scale: Callable[[float], float]) -> None:
    block = AffineCouplingBlock(8, COND, clamp=clamp)  # passive 4, active 4
    raw_s, raw_t = [7.0, -3.0, 0.5, 30.0], [1.0, 2.0, -4.0, 0.0]
    # Force the subnet output to the constant [raw_s, raw_t] (per channel, at every pixel): a last
    # conv with zero weights outputs its bias.
    with torch.no_grad():
        block.subnet[-1].weight.zero_()
        block.subnet[-1].bias.copy_(torch.tensor(raw_s + raw_t))
    x, cond = torch.randn(2, 8, 2, 3), torch.randn(1, COND, 2, 3)
    y, log_det = block(x, cond)

    expected_l = torch.tensor([log_scale(s) for s in raw_s]).view(1, 4, 1, 1)
    # gamma = 1 and beta = 0 at init, so y's active half is x2 * exp(l) + 0.1 * raw_t.
    expected_active = x[:, 4:] * torch.exp(expected_l) + 0.1 * torch.tensor(raw_t).view(1, 4, 1, 1)
    torch.testing.assert_close(y[:, block.perm_inverse][:, 4:], expected_active, rtol=0, atol=1e-12)
    expected_log_det = 6 * sum(log_scale(s) for s in raw_s)  # 2 x 3 pixels
    torch.testing.assert_close(log_det, torch.full((2,), expected_log_det), rtol=0, atol=1e-12)


def test_the_two_clamps_differ() -> None:
    # Guards the parametrised test above against both formulas silently coinciding at the chosen s.
    assert abs(1.9 * math.tanh(0.7) - 1.9 * math.tanh(0.7 / 1.9)) > 0.4


@pytest.mark.usefixtures("float64")
def testglobal_scale_is_one_at_init() -> None:
    block = AffineCouplingBlock(6, COND)
    torch.testing.assert_close(block.global_scale(), torch.ones(1, 6, 1, 1), rtol=0, atol=1e-12)
    assert torch.equal(block.global_offset, torch.zeros(1, 6, 1, 1))
    # gamma = 0.2 ln(1 + e^{g/2}): check the formula away from init too, by hand.
    with torch.no_grad():
        block.global_scale_raw.fill_(-2.0)
    expected = 0.2 * math.log(1 + math.exp(-1.0))
    torch.testing.assert_close(block.global_scale(), torch.full((1, 6, 1, 1), expected), rtol=0, atol=1e-12)


@pytest.mark.usefixtures("float64")
def test_zero_subnet_reduces_to_global_affine_and_permutation() -> None:
    block = make_block(4)
    with torch.no_grad():
        block.subnet[-1].weight.zero_()
        block.subnet[-1].bias.zero_()
    x, cond = torch.randn(2, 4, 3, 5), torch.randn(2, COND, 3, 5)
    y, log_det = block(x, cond)
    gamma = block.global_scale()
    torch.testing.assert_close(y, (x * gamma + block.global_offset)[:, block.perm], rtol=0, atol=1e-12)
    expected = 15 * torch.log(gamma).sum()  # H * W * sum_c log gamma_c
    torch.testing.assert_close(log_det, expected.expand(2), rtol=0, atol=1e-12)


def test_permutation_is_a_buffer_not_a_parameter() -> None:
    block = AffineCouplingBlock(8, COND, generator=torch.Generator().manual_seed(3))
    buffers, params = dict(block.named_buffers()), dict(block.named_parameters())
    assert "perm" in buffers and "perm_inverse" in buffers
    assert not any("perm" in name for name in params)
    assert "perm" in block.state_dict()  # saved with the weights
    assert block.perm.dtype == torch.long
    assert torch.equal(block.perm.sort().values, torch.arange(8))
    assert torch.equal(block.perm[block.perm_inverse], torch.arange(8))
    again = AffineCouplingBlock(8, COND, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.perm, block.perm)  # the generator makes it reproducible


def test_unknown_clamp_is_rejected() -> None:
    with pytest.raises(ValueError, match="clamp"):
        AffineCouplingBlock(4, COND, clamp="FREIA02")


def test_inference_reuses_the_condition_term_until_weight_or_condition_change(float64) -> None:
    block = AffineCouplingBlock(6, cond_channels=8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for p in block.parameters():  # off the identity init, so that the subnet matters
            p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(2, 6, 5, 4)
    cond = positional_encoding_2d(8, 5, 4)[None]

    def fresh(c: torch.Tensor) -> torch.Tensor:  # autograd on: the term is always computed anew
        with torch.enable_grad():
            return block(x, c)[0].detach()

    with torch.no_grad():
        first = block(x, cond)[0]
        term = block._cond_cache[2]
        assert torch.equal(block(x, cond)[0], first) and block._cond_cache[2] is term  # reused
        assert torch.equal(first, fresh(cond))
        block.subnet[0].weight.add_(torch.randn(block.subnet[0].weight.shape))  # as an optimizer step
        after = block(x, cond)[0]
        assert torch.equal(after, fresh(cond)) and not torch.allclose(after, first)
        other = cond.flip(-1).contiguous()
        assert torch.equal(block(x, other)[0], fresh(other))
        cond.mul_(2)  # the same tensor changed in place
        assert torch.equal(block(x, cond)[0], fresh(cond))
