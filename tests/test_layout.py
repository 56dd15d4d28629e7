"""The flows' fast CPU path (channels-last on oneDNN CPUs, foreach Adam), equal to the plain path."""

from __future__ import annotations

import pytest
import torch

from msflow.config import ModelConfig
from msflow.model.coupling import AffineCouplingBlock
from msflow.model.layout import channels_last_pays, permute_channels, to_layout
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.loop import make_optimizer

CL = torch.channels_last
needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


def small_model() -> MSFlow:
    torch.manual_seed(0)
    return MSFlow(ModelConfig(backbone="efficientnet_lite0", pretrained=False, image_size=64))


def input_layouts(model: MSFlow, feats: list[torch.Tensor]) -> set[bool]:
    """For every coupling block and fusion head the flows run: is its input channels-last?

    (Inside a subnet the LayerNorm leaves a channels-last view in either layout, so its second conv
    tells nothing; the blocks' inputs and the fusion heads' do.)
    """
    seen: set[bool] = set()
    modules = [m for m in model.modules() if isinstance(m, AffineCouplingBlock)]
    modules += [*model.fusion_flow.subnet_v_to_u.sigma_heads, *model.fusion_flow.subnet_u_to_v.tau_heads]
    hooks = [
        m.register_forward_pre_hook(lambda _, args: seen.add(args[0].is_contiguous(memory_format=CL)))
        for m in modules
    ]
    try:
        model.flow(feats)
    finally:
        for h in hooks:
            h.remove()
    return seen


@needs_onednn
def test_auto_layout_runs_the_flows_channels_last_on_the_cpu() -> None:
    model = small_model()
    feats = [torch.randn(2, *s) for s in model.feature_shapes]
    assert model.flow_layout == "auto" and channels_last_pays(feats[0])
    assert input_layouts(model, feats) == {True}  # every block, also after each permutation
    assert all(z.is_contiguous(memory_format=CL) for z in model.flow(feats).zs)
    model.flow_layout = "contiguous"
    assert input_layouts(model, feats) == {False}


def test_float64_and_onnx_tracing_keep_the_plain_layout() -> None:
    x = torch.randn(2, 8, 4, 4)
    assert not channels_last_pays(x.double())  # the parity tests run float64 through the plain path
    assert to_layout([x.double()], "auto")[0].is_contiguous()
    traced: list[bool] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        traced.append(channels_last_pays(t))
        return t * 2

    torch.jit.trace(probe, (x,), check_trace=False)
    assert traced == [False]
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout([x], "nhwc")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_permute_channels_equals_indexing_and_keeps_the_layout(fmt: torch.memory_format) -> None:
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=fmt)
    index = torch.randperm(6)
    y = permute_channels(x, index)
    assert torch.equal(y, x[:, index])
    assert y.is_contiguous(memory_format=fmt)


@needs_onednn
def test_channels_last_flows_and_gradients_equal_the_plain_path() -> None:
    model = small_model()
    feats = [torch.randn(3, *s) for s in model.feature_shapes]
    results = {}
    for layout in ("contiguous", "auto"):
        model.flow_layout = layout
        model.zero_grad(set_to_none=True)
        out = model.flow(feats)
        loss = nll(out.zs, out.log_det).mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.trainable_parameters()]
        results[layout] = (loss.detach(), [z.detach().contiguous() for z in out.zs], grads)
    (loss0, zs0, g0), (loss1, zs1, g1) = results["contiguous"], results["auto"]
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    for a, b in zip(zs1, zs0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    # ... and the inverse accepts channels-last latents: an exact round trip
    model.flow_layout = "auto"
    with torch.no_grad():
        back, _ = model.flow_inverse(model.flow(feats).zs)
    for a, b in zip(back, feats, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_make_optimizer_is_foreach_adam_and_steps_like_plain_adam() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = make_optimizer(params, 1e-2, torch.device("cpu"))
    slow = torch.optim.Adam(plain, lr=1e-2, foreach=False)
    assert isinstance(fast, torch.optim.Adam) and fast.defaults["foreach"] is True
    assert not fast.defaults["fused"]  # fused Adam broke resume equality (tests/test_distributed.py)
    assert fast.defaults["weight_decay"] == 0
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((params, fast), (plain, slow)):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))


def _stem_input_is_channels_last(backbone, images: torch.Tensor) -> bool:
    seen: list[bool] = []
    hook = backbone.stem[0].register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=CL))
    )
    try:
        feats = backbone(images)
    finally:
        hook.remove()
    torch.testing.assert_close(feats, backbone.raw_features(images), rtol=1e-4, atol=1e-5)  # same numbers
    return seen[0]


@needs_onednn
def test_a_lite_backbone_takes_its_input_channels_last_where_it_pays() -> None:
    backbone = small_model().backbone
    images = torch.rand(2, 3, 64, 64)
    assert backbone.input_layout == "auto" and _stem_input_is_channels_last(backbone, images)
    assert not _stem_input_is_channels_last(backbone.double(), images.double())  # parity: plain path
    resnet = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=64)).backbone
    assert resnet.input_layout == "contiguous" and not _stem_input_is_channels_last(resnet, images)
