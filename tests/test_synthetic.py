"""Synthetic defects (msflow.data.synthetic): where they are drawn, how large, how thin, how faint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from msflow.data.images import resize_mask
from msflow.data.synthetic import (
    AREA_RANGE,
    KINDS,
    LOW_CONTRAST,
    add_defect,
    model_pixel,
    synthetic_set,
)

FAINT = ("crack", "pit")


def _image(seed: int = 0, size: tuple[int, int] = (96, 192), spread: float = 15) -> Image.Image:
    """A smooth grey texture (H, W): noise on a grid 4x coarser, resized up."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, spread, (size[0] // 4, size[1] // 4, 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(base).resize((size[1], size[0]), Image.Resampling.BILINEAR)


def _shift(image: Image.Image, out: Image.Image, mask: np.ndarray) -> float:
    """Mean grey-level change inside the mask."""
    before = np.asarray(image.convert("L"), np.float32)
    return float(np.abs(np.asarray(out.convert("L"), np.float32) - before)[mask].mean())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_around_its_mask(kind: str) -> None:
    image = _image()
    out, mask = add_defect(image, np.random.default_rng(3), kind)
    assert out.size == image.size and mask.shape == (96, 192) and mask.dtype == bool
    assert 0.2 * AREA_RANGE[0] < mask.mean() < 2 * AREA_RANGE[1]
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(image, np.int16)).max(axis=2)
    assert diff[mask].mean() > (2 if kind in FAINT else 5)  # changed inside
    near = np.zeros_like(mask)  # the mask grown by the blend's few pixels
    ys, xs = np.nonzero(mask)
    near[max(0, ys.min() - 4) : ys.max() + 5, max(0, xs.min() - 4) : xs.max() + 5] = True
    assert diff[~near].max() <= 1  # untouched elsewhere (rounding only)


def test_areas_span_five_thousandths_of_a_percent_to_three_percent() -> None:
    images = [_image(i, (256, 256)) for i in range(10)]
    areas = np.array([m.mean() for _, m in synthetic_set(images, 6, seed=1)])
    assert areas.min() < 2e-4  # the smallest real pits are ~0.008 % of the image
    assert areas.max() > 1e-2
    assert np.mean(areas < 1e-3) > 0.3  # log-uniform: small defects are common, not rare


def test_every_kind_comes_in_several_sizes_even_in_a_small_check() -> None:
    """Sizes are stratified per kind: 4 copies of a kind are never all of one size (iid draws can be)."""
    images = [_image(i, (256, 256)) for i in range(10)]
    for seed in range(4):
        masks = [m for _, m in synthetic_set(images, 2, seed=seed)]  # 4 copies of each kind
        for kind in KINDS:
            areas = [m.sum() for k, m in enumerate(masks) if KINDS[k % len(KINDS)] == kind]
            assert max(areas) > 4 * min(areas), (seed, kind, areas)


def test_cracks_are_one_or_two_model_pixels_wide_and_long() -> None:
    image = _image(0, (512, 512))
    pixel = model_pixel((512, 512), (128, 128))
    assert pixel == 4.0
    for seed in range(8):
        _, mask = add_defect(image, np.random.default_rng(seed), "crack", size=0.5, pixel=pixel)
        small = resize_mask(mask, (128, 128))  # as the check compares it with the maps
        half_width = ndimage.distance_transform_edt(small).max()  # ~ width / 2 in model pixels
        assert 0.9 <= half_width <= 1.5, (seed, half_width)
        assert small.sum() >= 6 * half_width  # long, not a dot
        # drawn at the image's own resolution: wider there, so that the resize keeps it
        assert ndimage.distance_transform_edt(mask).max() >= 2
        # a model as sharp as the image: a 1-px line must keep its mask (a 2-px edge blur erased it)
        _, sharp = add_defect(image, np.random.default_rng(seed), "crack", size=0.5, pixel=1.0)
        assert sharp.sum() >= 6 and ndimage.distance_transform_edt(sharp).max() <= 1.5


def test_faint_kinds_have_a_low_contrast_and_the_others_a_high_one() -> None:
    spread = 12.0  # grey levels of the texture
    image = _image(0, (128, 256), spread)
    for seed in range(6):
        for kind in KINDS:
            out, mask = add_defect(image, np.random.default_rng(seed), kind, size=0.6)
            shift = _shift(image, out, mask)
            if kind in FAINT:
                # LOW_CONTRAST standard deviations of the surround (its std is below `spread` after the
                # bilinear resize), rounded to grey levels
                assert 1.5 <= shift <= LOW_CONTRAST[1] * spread + 1, (kind, seed, shift)
            elif kind != "patch":  # a patch is the image's own texture
                assert shift >= 25, (kind, seed, shift)


def test_a_flat_image_still_gets_a_visible_faint_defect() -> None:
    flat = Image.new("RGB", (128, 128), (120, 120, 120))
    out, mask = add_defect(flat, np.random.default_rng(0), "pit", size=0.9)
    assert mask.any() and _shift(flat, out, mask) >= 2.5


def test_model_pixel_and_bad_input() -> None:
    assert model_pixel((460, 1130), (160, 416)) == pytest.approx((460 / 160 * 1130 / 416) ** 0.5)
    assert model_pixel((2000, 3000), (256, 256), tile=512) == 2.0  # one tile fills the input
    assert model_pixel((50, 50), None) == 1.0
    with pytest.raises(ValueError, match="kind"):
        add_defect(_image(), np.random.default_rng(0), "dent")
    with pytest.raises(ValueError, match="size 1.5"):
        add_defect(_image(), np.random.default_rng(0), "pit", size=1.5)


def test_synthetic_set_is_reproducible_and_varied() -> None:
    images = [_image(0), _image(1)]
    a = synthetic_set(images, 3, seed=7, model_size=(48, 96))
    b = synthetic_set(images, 3, seed=7, model_size=(48, 96))
    c = synthetic_set(images, 3, seed=8, model_size=(48, 96))
    assert len(a) == 6
    assert all(
        np.array_equal(x[1], y[1]) and np.array_equal(np.asarray(x[0]), np.asarray(y[0]))
        for x, y in zip(a, b, strict=True)
    )
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))
