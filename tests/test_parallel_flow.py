"""ParallelFlow: a conditioned stack of coupling blocks."""

from __future__ import annotations

import math

import pytest
import torch

import msflow.model.parallel_flow as parallel_flow
from msflow.model.parallel_flow import ParallelFlow, positional_encoding_2d

try:
    from flow_helpers import assert_log_det_matches, brute_force_log_det, perturb_coupling_
except ImportError:  # tests/ became a package
    from .flow_helpers import assert_log_det_matches, brute_force_log_det, perturb_coupling_


def make_flow(channels: int = 4, num_blocks: int = 2, height: int = 3, width: int = 3) -> ParallelFlow:
    flow = ParallelFlow(
        channels, num_blocks, height, width, cond_channels=4, generator=torch.Generator().manual_seed(1)
    )
    for block in flow.blocks:
        perturb_coupling_(block)
    return flow


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("clamp", ["freia02", "freia_new"])
def test_parallel_flow_is_exactly_invertible(clamp: str) -> None:
    flow = ParallelFlow(5, 3, 4, 6, cond_channels=8, clamp=clamp)
    for block in flow.blocks:
        perturb_coupling_(block)
    x = torch.randn(2, 5, 4, 6)
    z, log_det = flow(x)
    x_rec, log_det_inv = flow.inverse(z)
    assert z.shape == x.shape and log_det.shape == (2,)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-11)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2), rtol=0, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_parallel_flow_log_det_matches_autograd_jacobian() -> None:
    flow = make_flow()  # C=4, 3x3, 2 blocks, cond_channels=4: a 36 x 36 Jacobian
    x = torch.randn(4, 3, 3)
    _, log_det = flow(x[None])
    reference = brute_force_log_det(lambda v: flow(v)[0], x)
    assert abs(float(reference)) > 0.1
    assert_log_det_matches(log_det[0], reference)
    with pytest.raises(AssertionError):  # the same check has teeth
        assert_log_det_matches(log_det[0] + 1e-3, reference)


@pytest.mark.usefixtures("float64")
def test_parallel_flow_inverse_log_det_matches_autograd_jacobian() -> None:
    flow = make_flow()
    z = torch.randn(4, 3, 3)
    _, log_det = flow.inverse(z[None])
    assert_log_det_matches(log_det[0], brute_force_log_det(lambda v: flow.inverse(v)[0], z))


def test_positional_encoding_hand_values() -> None:
    enc = positional_encoding_2d(64, 4, 5)  # (D, H, W); w_k = 10000^(-2k/32)
    assert enc.shape == (64, 4, 5)
    y, x = 2, 3
    assert enc[0, y, 1].item() == pytest.approx(0.8414709848078965, abs=1e-7)  # sin(1)
    assert enc[1, y, 1].item() == pytest.approx(0.5403023058681398, abs=1e-7)  # cos(1)
    assert enc[0, y, x].item() == pytest.approx(math.sin(3.0), abs=1e-7)
    assert enc[1, y, x].item() == pytest.approx(math.cos(3.0), abs=1e-7)
    assert enc[10, y, x].item() == pytest.approx(math.sin(3 * 10000 ** (-10 / 32)), abs=1e-7)  # k = 5
    assert enc[31, y, x].item() == pytest.approx(math.cos(3 * 10000 ** (-30 / 32)), abs=1e-7)  # k = 15
    assert enc[38, y, x].item() == pytest.approx(math.sin(2 * 10000 ** (-6 / 32)), abs=1e-7)  # row, k = 3
    assert enc[63, y, x].item() == pytest.approx(math.cos(2 * 10000 ** (-30 / 32)), abs=1e-7)  # row, k = 15
    assert enc[32, 0, 4].item() == 0.0 and enc[33, 0, 4].item() == 1.0  # sin(0), cos(0) at row 0
    # Column channels are constant down a column, row channels along a row.
    assert torch.equal(enc[:32], enc[:32, :1].expand(-1, 4, -1))
    assert torch.equal(enc[32:], enc[32:, :, :1].expand(-1, -1, 5))


def test_positional_encoding_needs_channels_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        positional_encoding_2d(6, 2, 2)


@pytest.mark.usefixtures("float64")
def test_positional_encoding_is_a_buffer_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = make_flow()
    assert "cond" in dict(flow.named_buffers())
    torch.testing.assert_close(flow.cond[0], positional_encoding_2d(4, 3, 3), rtol=0, atol=0)
    cond_before, pointer = flow.cond, flow.cond.data_ptr()

    def rebuilt(*args: object) -> None:
        raise AssertionError("positional encoding rebuilt inside forward/inverse (B10)")

    monkeypatch.setattr(parallel_flow, "positional_encoding_2d", rebuilt)
    x = torch.randn(2, 4, 3, 3)
    z, _ = flow(x)
    flow.inverse(z)
    flow(x)
    assert flow.cond is cond_before and flow.cond.data_ptr() == pointer


@pytest.mark.usefixtures("float64")
def test_flow_is_conditioned_on_position() -> None:
    flow = make_flow()
    x = torch.randn(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous()  # the same vector at every position
    z, _ = flow(x)
    assert not torch.allclose(z[..., 0, 0], z[..., 2, 1])


def test_feature_map_of_the_wrong_size_is_rejected() -> None:
    flow = ParallelFlow(4, 1, 3, 3, cond_channels=4)
    with pytest.raises(ValueError, match="does not match"):
        flow(torch.randn(1, 4, 4, 3))
