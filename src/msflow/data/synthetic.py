"""Synthetic defects drawn into good images, so that choices can be judged without any test labels.

``msflow train --score auto`` and ``msflow test --choose`` (``msflow.train.synthetic_check``) need
defective images to tell a good setting from a bad one, and the only images they may look at are
good ones. This module makes defects out of them, in five kinds:

- ``crack``:   a long, wandering line 1-2 pixels wide *at the model's input size*, darker (mostly) or
               lighter than its surroundings by about their own grey-level spread (low contrast);
- ``pit``:     a small spot (0.005-0.3 % of the image), shifted by the same low contrast;
- ``patch``:   a piece of the same image, flipped or rotated, pasted elsewhere through an elliptic mask
               (CutPaste-like: texture that is plausible but out of place);
- ``scratch``: a thin polyline shifted by 40-90 grey levels (a clearly visible mark);
- ``blob``:    an ellipse whose brightness is shifted by 40-90 levels and whose texture is noise.

Why cracks and pits, and why these sizes: real defects are often thin and faint. On road cracks
(1-3 px wide) and ball-screw pits (median 0.17 % of the image, 5-95 %: 0.008-0.8 %) a blur of the maps
cost up to 8.5 pixel-AUROC points while a proxy of larger, high-contrast defects rated it neutral or
better (docs/results.md "Real defects"). Measured on those sets at the model's input size, the defects
differ from the grey level around them by 7-40 levels, 0.6-2.8 times that surround's standard deviation;
``LOW_CONTRAST`` draws from that range. Areas are log-uniform over ``AREA_RANGE`` (0.005 % to 3 %), and
:func:`synthetic_set` stratifies them per kind, so every check holds small and large defects of every
kind however few copies it has. A defect is never smaller than ``MIN_MODEL_PIXELS`` model-input pixels,
so it survives the resize to the model.

A defect is blended with its mask softened by at most one model pixel (less for a thin one, whose
centre must stay marked); the returned mask marks the pixels the defect changed (blend weight > 0.5).
Everything is drawn from the ``numpy.random.Generator`` passed in, so a seed fixes the set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from msflow.data.images import ImageLike, decode, to_uint8

KINDS = ("crack", "pit", "patch", "scratch", "blob")
AREA_RANGE = (0.00005, 0.03)  # share of the image a defect covers, drawn log-uniformly
KIND_AREAS = {"pit": (AREA_RANGE[0], 0.003)}  # pits are small; the other kinds use AREA_RANGE
CRACK_WIDTHS = (1, 2)  # model-input pixels
LOW_CONTRAST = (0.5, 3.0)  # crack/pit brightness shift, in standard deviations of its surroundings
CONTRAST_LEVELS = (3.0, 60.0)  # ... clipped to this many grey levels (a flat image still gets a defect)
MIN_MODEL_PIXELS = 3.0  # the smallest defect, in model-input pixels


def model_pixel(shape: tuple[int, int], model_size: tuple[int, int] | None, tile: int = 0) -> float:
    """How many pixels of an image of ``shape`` (H, W) make one model-input pixel: the side of the
    model's input ``model_size`` (H, W) covers the image (or one ``tile`` of it); 1 if unknown."""
    if model_size is None:
        return 1.0
    if tile:
        return tile / model_size[0]
    return math.sqrt(shape[0] / model_size[0] * shape[1] / model_size[1])


def _area(size: float, h: int, w: int, kind: str, pixel: float) -> float:
    """Pixels of a defect at quantile ``size`` of its kind's log-uniform area range."""
    lo, hi = np.log(KIND_AREAS.get(kind, AREA_RANGE))
    return max(math.exp(lo + size * (hi - lo)) * h * w, MIN_MODEL_PIXELS * pixel * pixel)


def _ellipse_mask(height: int, width: int, box: tuple[float, float, float, float]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def _random_ellipse(
    rng: np.random.Generator, height: int, width: int, area: float, spread: float = 0.8
) -> tuple[float, float, float, float]:
    aspect = math.exp(rng.uniform(-spread, spread))
    a = math.sqrt(area / math.pi * aspect)  # semi-axes a (x), b (y) with pi * a * b = area
    b = area / (math.pi * a)
    a, b = max(0.75, min(a, width / 3)), max(0.75, min(b, height / 3))  # at least a drawn pixel
    cx, cy = rng.uniform(a, width - a), rng.uniform(b, height - b)
    return (cx - a, cy - b, cx + a, cy + b)


def _polyline(
    rng: np.random.Generator, h: int, w: int, length: float, segments: int, turn: float
) -> list[tuple[float, float]]:
    """A random walk of ``segments`` steps of ``length / segments``, turning up to ``turn`` radians."""
    points = [(rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)]
    angle = rng.uniform(0, 2 * math.pi)
    for _ in range(segments):
        angle += rng.uniform(-turn, turn)
        x = float(np.clip(points[-1][0] + length / segments * math.cos(angle), 0, w - 1))
        y = float(np.clip(points[-1][1] + length / segments * math.sin(angle), 0, h - 1))
        points.append((x, y))
    return points


def _line_mask(h: int, w: int, points: list[tuple[float, float]], width: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).line(points, fill=255, width=width, joint="curve")
    return mask


Made = tuple[np.ndarray, Image.Image, float]  # changed image, mask, thickness (pixels) of the defect


def _patch(rng: np.random.Generator, img: np.ndarray, area: float, pixel: float) -> Made:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = _random_ellipse(rng, h, w, area)
    ph, pw = max(2, int(math.ceil(y1 - y0))), max(2, int(math.ceil(x1 - x0)))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    piece = img[sy : sy + ph, sx : sx + pw]
    piece = np.rot90(piece, int(rng.integers(1, 4))) if ph == pw else piece[::-1, ::-1]
    piece = piece[: min(ph, piece.shape[0]), : min(pw, piece.shape[1])]
    out = img.copy()
    ty, tx = int(y0), int(x0)
    ph, pw = min(piece.shape[0], h - ty), min(piece.shape[1], w - tx)
    out[ty : ty + ph, tx : tx + pw] = piece[:ph, :pw]
    return out, _ellipse_mask(h, w, (x0, y0, x1, y1)), min(x1 - x0, y1 - y0)


def _scratch(rng: np.random.Generator, img: np.ndarray, area: float, pixel: float) -> Made:
    h, w = img.shape[:2]
    side = min(h, w)
    width = max(1, int(round(side * rng.uniform(0.004, 0.015))))
    length = min(area / width, 1.5 * side)
    mask = _line_mask(h, w, _polyline(rng, h, w, length, int(rng.integers(1, 4)), 0.6), width)
    return _shift(rng, img, np.asarray(mask) > 0), mask, width


def _crack(rng: np.random.Generator, img: np.ndarray, area: float, pixel: float) -> Made:
    """A faint line 1-2 model pixels wide, as long as its area asks (at least 6 model pixels), wandering
    in many short steps like a crack."""
    h, w = img.shape[:2]
    width = max(1, int(round(CRACK_WIDTHS[int(rng.integers(len(CRACK_WIDTHS)))] * pixel)))
    length = min(max(area / width, 6 * pixel), 1.5 * min(h, w))
    points = _polyline(rng, h, w, length, int(rng.integers(3, 9)), 0.5)
    mask = _line_mask(h, w, points, width)
    return _faint(rng, img, np.asarray(mask) > 0, pixel), mask, width


def _pit(rng: np.random.Generator, img: np.ndarray, area: float, pixel: float) -> Made:
    """A small, nearly round spot shifted by a low contrast."""
    h, w = img.shape[:2]
    box = _random_ellipse(rng, h, w, area, spread=0.4)
    mask = _ellipse_mask(h, w, box)
    return _faint(rng, img, np.asarray(mask) > 0, pixel), mask, min(box[2] - box[0], box[3] - box[1])


def _shift(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Move the region's brightness away from its own mean by 40-90 grey levels (darker or lighter)."""
    mean = float(img[region].mean()) if region.any() else 128.0
    sign = -1.0 if mean > 128 else 1.0
    if rng.random() < 0.3:
        sign = -sign
    delta = sign * rng.uniform(40, 90)
    return np.clip(img.astype(np.float32) + delta, 0, 255)


def _faint(rng: np.random.Generator, img: np.ndarray, region: np.ndarray, pixel: float) -> np.ndarray:
    """Shift the region by ``LOW_CONTRAST`` standard deviations of the grey levels around it (a box
    grown by 4 model pixels), mostly darker, as real cracks and pits are; within ``CONTRAST_LEVELS``."""
    if not region.any():
        return img.astype(np.float32)
    ys, xs = np.nonzero(region)
    grow = max(3, int(round(4 * pixel)))
    around = img[
        max(0, ys.min() - grow) : ys.max() + grow + 1, max(0, xs.min() - grow) : xs.max() + grow + 1
    ].mean(axis=2)
    delta = float(np.clip(math.exp(rng.uniform(*np.log(LOW_CONTRAST))) * around.std(), *CONTRAST_LEVELS))
    darker = rng.random() < 0.75
    if float(img[region].mean()) - delta < 0:  # no room below black
        darker = False
    return np.clip(img.astype(np.float32) + (-delta if darker else delta), 0, 255)


def _blob(rng: np.random.Generator, img: np.ndarray, area: float, pixel: float) -> Made:
    h, w = img.shape[:2]
    box = _random_ellipse(rng, h, w, area)
    mask = _ellipse_mask(h, w, box)
    shifted = _shift(rng, img, np.asarray(mask) > 0)
    noise = rng.normal(0, rng.uniform(8, 25), size=(h, w, 1)).astype(np.float32)
    return np.clip(shifted + noise, 0, 255), mask, min(box[2] - box[0], box[3] - box[1])


MAKERS = {"crack": _crack, "pit": _pit, "patch": _patch, "scratch": _scratch, "blob": _blob}


def add_defect(
    image: ImageLike,
    rng: np.random.Generator,
    kind: str | None = None,
    size: float | None = None,
    pixel: float = 1.0,
) -> tuple[Image.Image, np.ndarray]:
    """Draw one synthetic defect into ``image`` (anything :func:`~msflow.data.images.decode` reads);
    returns (defective 8-bit RGB image, boolean (H, W) mask).

    ``kind`` is one of :data:`KINDS`, or ``None`` to draw one at random; ``size`` in [0, 1) the quantile
    of its log-uniform area (``None``: drawn); ``pixel`` the image pixels per model-input pixel
    (:func:`model_pixel`), which sets the cracks' width and the smallest defect.
    """
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind not in MAKERS:
        raise ValueError(f"unknown synthetic defect kind {kind!r}; use one of {list(KINDS)}")
    if not (pixel > 0 and (size is None or 0 <= size < 1)):
        raise ValueError(f"synthetic defect size {size!r} must be in [0, 1) and pixel {pixel!r} > 0")
    img = to_uint8(decode(image))
    h, w = img.shape[:2]
    area = _area(rng.random() if size is None else size, h, w, kind, pixel)
    changed, mask, thickness = MAKERS[kind](rng, img, area, pixel)
    # about one model pixel at 256 px, but at most a quarter of the defect's thickness: a 1-px line
    # blurred by 1 px would fall below the mask's 0.5 blend weight everywhere
    blur = min(max(0.5, min(h, w) / 256), max(0.25, thickness / 4))
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)[..., None] / 255.0
    out = img.astype(np.float32) * (1 - alpha) + np.asarray(changed, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), alpha[..., 0] > 0.5


def synthetic_set(
    images: Sequence[ImageLike],
    per_image: int,
    seed: int,
    model_size: tuple[int, int] | None = None,
    tile: int = 0,
) -> list[tuple[Image.Image, np.ndarray]]:
    """``per_image`` defective copies of each image (kinds cycling), reproducible from ``seed``.

    Each kind's sizes are stratified over its area range (one draw per equal-probability stratum,
    strata shuffled), so a check of a few images still holds small and large defects of every kind.
    ``model_size`` (H, W) and ``tile``: the model's input, for :func:`model_pixel`.
    """
    rng = np.random.default_rng(seed)
    kinds = [KINDS[k % len(KINDS)] for k in range(len(images) * per_image)]
    sizes = np.empty(len(kinds))
    for kind in KINDS:
        at = [k for k, name in enumerate(kinds) if name == kind]
        sizes[at] = (rng.permutation(len(at)) + rng.random(len(at))) / max(len(at), 1)
    out = []
    for i, image in enumerate(images):
        img = decode(image)
        pixel = model_pixel(img.shape[:2], model_size, tile)
        for k in range(i * per_image, (i + 1) * per_image):
            out.append(add_defect(img, rng, kinds[k], float(sizes[k]), pixel))
    return out


__all__ = [
    "AREA_RANGE",
    "KINDS",
    "LOW_CONTRAST",
    "add_defect",
    "model_pixel",
    "synthetic_set",
]
