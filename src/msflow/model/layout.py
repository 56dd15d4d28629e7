"""Where the flows' tensors live in memory: channels-last on CPUs whose convolutions run in oneDNN.

The flows are stacks of small 3x3 convolutions (12 to 120 channels for EfficientNet-Lite0) with a
LayerNorm over the channels of each pixel in between. In the default NCHW layout oneDNN reorders every
input and output to its blocked format and back, and the LayerNorm transposes its input to put the
channels last and back; at these channel counts the copies cost as much as the arithmetic. With every
tensor channels-last (NHWC in memory) oneDNN convolves in place and the LayerNorm's transposes are free.
The values are the same up to float32 rounding (oneDNN sums in a different order).

A flow keeps the layout of its input as long as every op preserves it; the one that does not is
indexing along the channels (it returns NCHW), hence :func:`permute_channels`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Layout = Literal["auto", "channels_last", "contiguous"]
LAYOUTS = get_args(Layout)


def channels_last_pays(x: Tensor) -> bool:
    """True where channels-last is the faster layout for the flows: float32 on a CPU with oneDNN.

    float64 (the parity tests) and bfloat16 keep NCHW: oneDNN does not run float64, and the bfloat16
    path was measured in NCHW. CUDA keeps NCHW: its float32 convolutions were not measured here.
    Exports to ONNX keep NCHW so that the exported graph has no layout transposes.
    """
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.is_autocast_enabled("cpu")
    )


def to_layout(xs: list[Tensor], layout: Layout) -> list[Tensor]:
    """The flows' inputs in ``layout`` ("auto": channels-last where :func:`channels_last_pays`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if layout == "contiguous" or (layout == "auto" and not all(channels_last_pays(x) for x in xs)):
        return xs
    return [x.contiguous(memory_format=torch.channels_last) for x in xs]


def permute_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` in x's own layout (plain indexing turns a channels-last tensor into NCHW).

    ``index_select`` rather than ``x[:, index]``: the same values, and its backward (``index_add``)
    was 2.5-3.5x faster than indexing's (``index_put`` with accumulation) at the flows' sizes.
    """
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)
