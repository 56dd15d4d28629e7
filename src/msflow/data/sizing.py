"""``image_size: auto[:N]``: a model input with the training images' shape, at a fixed pixel cost.

"auto:N" keeps the median aspect ratio r = W/H of the training images within the pixel budget of an
N x N input: H = N / sqrt(r), W = N * sqrt(r), each rounded to the nearest multiple of 32 (the coarsest
pooled scale is 1/32 of the input), at least 32. Only the image headers are read. Why, rather than the
paper's square: docs/choices.md, "Image size".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from msflow.config import parse_image_size
from msflow.data.datasets import Sample
from msflow.data.images import header_size
from msflow.errors import DataError

STRIDE = 32  # every side of the input must be a multiple of the coarsest feature stride


def size_for_aspect(aspect: float, budget: int) -> int | tuple[int, int]:
    """(H, W) multiples of 32 with W/H close to ``aspect`` and H*W close to budget**2 (an int if square)."""

    def snap(x: float) -> int:
        return max(STRIDE, min(2048, int(round(x / STRIDE)) * STRIDE))

    root = math.sqrt(aspect)
    return parse_image_size((snap(budget / root), snap(budget * root)))  # type: ignore[return-value]


def resolve_image_size(
    image_size: int | tuple[int, int] | str, samples: Sequence[Sample]
) -> int | tuple[int, int]:
    """A concrete size: ``image_size`` itself, or "auto:N" resolved from the median width / height of
    ``samples`` (headers only)."""
    if not isinstance(image_size, str):
        return image_size
    if not samples:
        raise DataError("image_size 'auto' needs training images to measure")
    aspect = float(np.median([w / h for h, w in (header_size(s.image) for s in samples)]))
    return size_for_aspect(aspect, int(image_size.partition(":")[2]))
