"""benchmarks/texture_sets.py, the hard-texture generator: deterministic, MVTec layout, exact masks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks" / "texture_sets.py").is_file():
    pytest.skip("no benchmarks/ folder (not a source checkout)", allow_module_level=True)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.texture_sets import (  # noqa: E402 - needs the checkout on sys.path
    DEFECTS,
    SIZE,
    TEXTURES,
    render_defective,
    render_good,
    write_texture,
)
from msflow.data.datasets import load_dataset, validate_samples  # noqa: E402

CASES = [(t, k) for t in TEXTURES for k in DEFECTS[t]]


def test_same_seed_same_images_other_seed_other_images():
    for texture in TEXTURES:
        a = render_good(texture, 3, "train", 1)
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, render_good(texture, 3, "train", 1))
        assert not np.array_equal(a, render_good(texture, 4, "train", 1))
        assert not np.array_equal(a, render_good(texture, 3, "train", 2))
        assert not np.array_equal(a, render_good(texture, 3, "test_good", 1))
    clean, bad, mask = render_defective("weave", "stain", 3, 0)
    again = render_defective("weave", "stain", 3, 0)
    for x, y in zip((clean, bad, mask), again, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("texture", "kind"), CASES)
def test_mask_is_exactly_where_the_image_changed(texture, kind):
    for index in range(1):
        clean, bad, mask = render_defective(texture, kind, 0, index)
        changed = np.abs(bad.astype(int) - clean.astype(int)).max(axis=2) > 0
        share = mask.mean()
        assert 0.001 < share < 0.05, f"{texture}/{kind}: defect covers {share:.4f} of the image"
        assert not changed[~mask].any(), "the image changed outside its mask"
        # The region whose texture was re-rendered changed visibly, not only at a few pixels.
        assert changed[mask].mean() > 0.3, (
            f"{texture}/{kind}: only {changed[mask].mean():.2f} of the mask changed"
        )
        diff = np.abs(bad.astype(float) - clean.astype(float)).max(axis=2)[mask].mean()
        assert diff > 3, f"{texture}/{kind}: mean change {diff:.1f} grey levels"


def test_written_folder_is_a_valid_mvtec_category(tmp_path):
    folder = write_texture(tmp_path, "carpet", seed=1, n_train=3, n_good=2, n_per_defect=2)
    name, train, test = load_dataset(str(folder))
    assert name == "carpet" and len(train) == 3
    validate_samples(train)
    validate_samples(test, "test set")
    assert sorted({s.defect_type for s in test}) == sorted({"good", *DEFECTS["carpet"]})
    assert len(test) == 2 + 2 * len(DEFECTS["carpet"])
    for sample in test:
        if sample.label == 0:
            assert sample.mask is None and sample.defect_type == "good"
            continue
        mask = np.array(Image.open(sample.mask)) > 127
        assert mask.any(), f"empty mask {sample.mask}"
        # The file is the generator's image, and its mask the generator's mask.
        index = int(sample.image.stem)
        clean, bad, expected = render_defective("carpet", sample.defect_type, 1, index)
        np.testing.assert_array_equal(np.array(Image.open(sample.image)), bad)
        np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(np.array(Image.open(train[0].image)), render_good("carpet", 1, "train", 0))
