"""A tiny fake MVTec-layout category, written into a temporary folder (anomalib's dummy-data idea).

Good images are smooth noise textures; defective ones add a bright square whose mask is saved in
``ground_truth``. Small enough for end-to-end CLI tests in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.normal(128, 20, (size // 4, size // 4, 3)).clip(0, 255).astype(np.uint8)
    return np.array(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR))


def make_fake_category(
    root: Path,
    n_train: int = 8,
    n_good: int = 3,
    n_bad: int = 3,
    size: int = 48,
    seed: int = 0,
    masks: bool = True,
) -> Path:
    """Write ``root/train/good``, ``root/test/{good,scratch}`` and (optionally) ``root/ground_truth``."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng, size)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        (root / "test" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng, size)).save(root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = _texture(rng, size)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 16, 2)
        img[y : y + 12, x : x + 12] = 255
        mask[y : y + 12, x : x + 12] = 255
        (root / "test" / "scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "test" / "scratch" / f"{i:03d}.png")
        if masks:
            (root / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root
