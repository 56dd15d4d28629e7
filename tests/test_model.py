"""MSFlow wiring: shapes from the backbone, gradients, a frozen backbone, save/load, size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msflow import ModelConfig, MSFlow
from msflow.model.backbone import FeatureExtractor
from msflow.model.loss import nll

try:
    from flow_helpers import perturb_coupling_
except ImportError:  # tests/ became a package
    from .flow_helpers import perturb_coupling_


def build(seed: int = 9826, torch_seed: int = 0, **overrides: object) -> MSFlow:
    torch.manual_seed(torch_seed)  # flow weights and random backbone weights
    options = {"backbone": "resnet18", "pretrained": False, "image_size": 64, "seed": seed, **overrides}
    return MSFlow(ModelConfig(**options))


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wide_resnet() -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor("wide_resnet50_2", pretrained=False)


@pytest.mark.parametrize(
    ("backbone", "channels"), [("resnet18", [64, 128, 256]), ("efficientnet_lite0", [24, 40, 112])]
)
def test_per_scale_latent_shapes_follow_the_backbone(backbone: str, channels: list[int]) -> None:
    model = build(backbone=backbone)
    assert model.backbone.channels == channels
    out = model(images())
    # stage strides 4, 8, 16, then the 3x3/2 pool: H_l = 64 / (2 s)
    expected = [(2, c, 64 // (2 * s), 64 // (2 * s)) for c, s in zip(channels, [4, 8, 16], strict=True)]
    assert [tuple(z.shape) for z in out.zs] == expected
    assert [(c, h, w) for _, c, h, w in expected] == model.feature_shapes
    assert out.log_det.shape == (2,) and torch.isfinite(out.log_det).all()


def test_wide_resnet_feature_shapes_at_64_px(wide_resnet: FeatureExtractor) -> None:
    assert wide_resnet.channels == [256, 512, 1024]
    feats = wide_resnet(images())
    assert [tuple(f.shape) for f in feats] == [(2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2)]


def test_wide_resnet_at_512_px_has_the_papers_size(wide_resnet: FeatureExtractor) -> None:
    # Spec 1 (feature shapes table) and 3.3 (parameter count, ~99.6 M).
    model = MSFlow(
        ModelConfig(backbone="wide_resnet50_2", pretrained=False, image_size=512), backbone=wide_resnet
    )
    assert model.feature_shapes == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    counts = model.parameter_counts()
    assert counts["backbone"] == 0
    assert abs(counts["total"] - 99.6e6) <= 0.005 * 99.6e6
    for part, approx in [
        ("parallel_flow_1", 1.55e6),
        ("parallel_flow_2", 12.0e6),
        ("parallel_flow_3", 66.4e6),
        ("fusion_flow", 19.6e6),
    ]:
        assert abs(counts[part] - approx) <= 0.005 * approx, part
    assert [len(f.blocks) for f in model.parallel_flows] == [2, 5, 8]


def test_every_trainable_parameter_gets_a_gradient() -> None:
    model = build()
    model.train()
    out = model(images())
    nll(out.zs, out.log_det).mean().backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert all(p.grad is None for p in model.backbone.parameters())


def test_backbone_is_unchanged_by_an_optimizer_step() -> None:
    model = build()
    model.train()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    flows_before = {k: v.clone() for k, v in model.parallel_flows.state_dict().items()}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    out = model(images())
    nll(out.zs, out.log_det).mean().backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, backbone_before[key]), key
    changed = [k for k, v in model.parallel_flows.state_dict().items() if not torch.equal(v, flows_before[k])]
    assert changed  # the flows did train


def test_backbone_has_no_trainable_parameters_and_stays_in_eval_mode() -> None:
    model = build()
    model.train()
    assert model.training and model.parallel_flows.training and model.fusion_flow.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.parameter_counts()["backbone"] == 0
    flow_params = list(model.parallel_flows.parameters()) + list(model.fusion_flow.parameters())
    assert len(model.trainable_parameters()) == len(flow_params)


def test_same_output_in_train_and_eval_mode() -> None:
    model = build()
    x = images()
    model.train()
    out_train = model(x)
    model.eval()
    out_eval = model(x)
    assert all(torch.equal(a, b) for a, b in zip(out_train.zs, out_eval.zs, strict=True))
    assert torch.equal(out_train.log_det, out_eval.log_det)


def test_state_dict_round_trip_reproduces_outputs_exactly(tmp_path: Path) -> None:
    model = build(seed=1, torch_seed=0)
    with torch.no_grad():  # make the saved non-parameter state non-trivial too
        model.standardizers[0].mean.normal_()
        model.standardizers[2].std.uniform_(0.5, 2.0)
    other = build(seed=2, torch_seed=5)  # different weights and different permutations
    assert not torch.equal(model.parallel_flows[2].blocks[0].perm, other.parallel_flows[2].blocks[0].perm)
    assert not torch.equal(model.fusion_flow.permutations[2].perm, other.fusion_flow.permutations[2].perm)

    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.eval()
    other.eval()
    x = images()
    with torch.no_grad():
        a, b = model(x), other(x)
        pa, pb = model.predict(x), other.predict(x)
    assert all(torch.equal(za, zb) for za, zb in zip(a.zs, b.zs, strict=True))
    assert torch.equal(a.log_det, b.log_det)
    assert torch.equal(pa.scores, pb.scores) and torch.equal(pa.pixel_map, pb.pixel_map)


def test_predict_maps_have_the_image_size() -> None:
    model = build()
    with torch.no_grad():
        out = model.predict(images(3))
    assert out.scores.shape == (3,)
    assert out.pixel_map.shape == (3, 64, 64) and out.image_map.shape == (3, 64, 64)


@pytest.mark.usefixtures("float64")
def test_flow_stack_is_exactly_invertible() -> None:
    model = build().double()
    for flow in model.parallel_flows:
        for block in flow.blocks:
            perturb_coupling_(block, scale=0.1)
    feats = [torch.randn(2, c, h, w) for c, h, w in model.feature_shapes]
    with torch.no_grad():
        zs, log_det = model.flow(feats)
        feats_rec, log_det_inv = model.flow_inverse(zs)
    assert log_det.abs().min() > 1.0  # a real change of volume, not the identity
    for f, f_rec in zip(feats, feats_rec, strict=True):
        torch.testing.assert_close(f_rec, f, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2), rtol=0, atol=1e-9)
