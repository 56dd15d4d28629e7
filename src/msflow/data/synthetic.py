"""Synthetic defects drawn into good images, so that choices can be judged without any test labels.

``msflow train --score auto`` and ``msflow test --choose`` (``msflow.train.synthetic_check``) need
defective images, and the only images they may look at are good ones. Each call draws one of three
kinds, sized log-uniformly over 0.05 % to 3 % of the image so that small defects (pits, a few hundred
pixels at 256 px) are as common as large ones:

- ``patch``:   a flipped or rotated piece of the same image pasted elsewhere through an elliptic mask
               (CutPaste-like: texture that is plausible but out of place);
- ``scratch``: a thin polyline, darker or lighter than the image around it;
- ``blob``:    an ellipse whose brightness is shifted and whose texture is replaced by noise.

A defect is blended through its mask blurred by about one pixel, so it has no artificially sharp edge;
the returned mask marks the pixels it changed (blend weight > 0.5). The ``numpy.random.Generator``
passed in fixes the set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from msflow.data.images import ImageLike, decode, to_uint8

KINDS = ("patch", "scratch", "blob")
AREA_RANGE = (0.0005, 0.03)  # share of the image a defect covers, drawn log-uniformly


def _ellipse_mask(height: int, width: int, box: tuple[float, float, float, float]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def _random_ellipse(rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float, float]:
    area = math.exp(rng.uniform(*np.log(AREA_RANGE))) * height * width
    aspect = math.exp(rng.uniform(-0.8, 0.8))
    a = math.sqrt(area / math.pi * aspect)  # semi-axes a (x), b (y) with pi * a * b = area
    b = area / (math.pi * a)
    a, b = min(a, width / 3), min(b, height / 3)
    cx, cy = rng.uniform(a, width - a), rng.uniform(b, height - b)
    return (cx - a, cy - b, cx + a, cy + b)


def _patch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, Image.Image]:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = _random_ellipse(rng, h, w)
    ph, pw = max(2, int(math.ceil(y1 - y0))), max(2, int(math.ceil(x1 - x0)))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    piece = img[sy : sy + ph, sx : sx + pw]
    piece = np.rot90(piece, int(rng.integers(1, 4))) if ph == pw else piece[::-1, ::-1]
    out = img.copy()
    ty, tx = int(y0), int(x0)
    ph, pw = min(piece.shape[0], h - ty), min(piece.shape[1], w - tx)
    out[ty : ty + ph, tx : tx + pw] = piece[:ph, :pw]
    return out, _ellipse_mask(h, w, (x0, y0, x1, y1))


def _scratch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, Image.Image]:
    h, w = img.shape[:2]
    side = min(h, w)
    width = max(1, int(round(side * rng.uniform(0.004, 0.015))))
    target_area = math.exp(rng.uniform(*np.log(AREA_RANGE))) * h * w
    length = min(target_area / width, 1.5 * side)
    points = [(rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)]
    segments = int(rng.integers(1, 4))
    angle = rng.uniform(0, 2 * math.pi)
    for _ in range(segments):
        angle += rng.uniform(-0.6, 0.6)
        step = length / segments
        x = float(np.clip(points[-1][0] + step * math.cos(angle), 0, w - 1))
        y = float(np.clip(points[-1][1] + step * math.sin(angle), 0, h - 1))
        points.append((x, y))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).line(points, fill=255, width=width, joint="curve")
    return _shift(rng, img, np.asarray(mask) > 0), mask


def _shift(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Move the region's brightness away from its own mean by 40-90 grey levels (darker or lighter)."""
    mean = float(img[region].mean()) if region.any() else 128.0
    sign = -1.0 if mean > 128 else 1.0
    if rng.random() < 0.3:
        sign = -sign
    delta = sign * rng.uniform(40, 90)
    return np.clip(img.astype(np.float32) + delta, 0, 255)


def _blob(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, Image.Image]:
    h, w = img.shape[:2]
    mask = _ellipse_mask(h, w, _random_ellipse(rng, h, w))
    shifted = _shift(rng, img, np.asarray(mask) > 0)
    noise = rng.normal(0, rng.uniform(8, 25), size=(h, w, 1)).astype(np.float32)
    return np.clip(shifted + noise, 0, 255), mask


def add_defect(
    image: ImageLike, rng: np.random.Generator, kind: str | None = None
) -> tuple[Image.Image, np.ndarray]:
    """Draw one synthetic defect of ``kind`` (one of :data:`KINDS`, ``None``: at random) into ``image``
    (anything :func:`~msflow.data.images.decode` reads): (defective 8-bit RGB image, bool (H, W) mask)."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    makers = {"patch": _patch, "scratch": _scratch, "blob": _blob}
    if kind not in makers:
        raise ValueError(f"unknown synthetic defect kind {kind!r}; use one of {list(KINDS)}")
    img = to_uint8(decode(image))
    h, w = img.shape[:2]
    changed, mask = makers[kind](rng, img)
    blur = max(0.5, min(h, w) / 256)  # about one model pixel at 256 px
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)[..., None] / 255.0
    out = img.astype(np.float32) * (1 - alpha) + np.asarray(changed, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), alpha[..., 0] > 0.5


def synthetic_set(
    images: Sequence[ImageLike], per_image: int, seed: int
) -> list[tuple[Image.Image, np.ndarray]]:
    """``per_image`` defective copies of each image (kinds cycling), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    copies = range(len(images) * per_image)  # the kinds cycle over all copies
    return [add_defect(images[n // per_image], rng, KINDS[n % len(KINDS)]) for n in copies]
