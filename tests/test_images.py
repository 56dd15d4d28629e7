"""Tests for msflow.images: every odd image becomes RGB uint8, every bad file one clear DataError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from msflow.data.images import (
    IMAGE_EXTENSIONS,
    list_images,
    mask_to_tensor,
    read_image,
    read_mask,
    resize_mask,
    to_rgb,
    to_tensor,
)
from msflow.errors import DataError


def _noise(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_rgb_array(path: Path) -> np.ndarray:
    img = read_image(path)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def test_truncated_loading_stays_off() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tiff", "TIFF"), (".tif", "TIFF")]
)
def test_rgb_formats(tmp_path: Path, ext: str, fmt: str) -> None:
    path = tmp_path / f"x{ext}"
    Image.fromarray(_noise()).save(path, fmt)
    assert _as_rgb_array(path).shape == (48, 40, 3)


def test_grey_is_replicated(tmp_path: Path) -> None:
    grey = np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "g.png")
    arr = _as_rgb_array(tmp_path / "g.png")
    assert all(np.array_equal(arr[..., c], grey) for c in range(3))


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = _as_rgb_array(tmp_path / "a.png")
    assert (arr[:2] == 200).all() and (arr[2:] == 0).all()


def test_la_and_palette(tmp_path: Path) -> None:
    Image.new("LA", (5, 6), (100, 255)).save(tmp_path / "la.png")
    assert (_as_rgb_array(tmp_path / "la.png") == 100).all()
    pal = Image.fromarray(_noise()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    assert _as_rgb_array(tmp_path / "p.png").shape == (48, 40, 3)


@pytest.mark.parametrize("dtype,fmt", [("<u2", "PNG"), ("<u2", "TIFF"), (">u2", "TIFF")])
def test_sixteen_bit_divided_by_257(tmp_path: Path, dtype: str, fmt: str) -> None:
    values = np.array([[0, 257, 65535, 1000]], dtype=dtype)
    path = tmp_path / f"16.{fmt.lower()}"
    Image.fromarray(values).save(path, fmt)
    arr = _as_rgb_array(path)
    assert arr[0, :, 0].tolist() == [0, 1, 255, 4]


def test_int32_and_float_modes() -> None:
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 255, 255, 0]
    f = Image.fromarray(np.array([[-3.0, 0.4, 128.6, 999.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 1].tolist() == [0, 0, 129, 255]


def test_float_tiff(tmp_path: Path) -> None:
    Image.fromarray(np.full((3, 3), 77.0, dtype=np.float32)).save(tmp_path / "f.tif")
    assert (_as_rgb_array(tmp_path / "f.tif") == 77).all()


def test_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    arr = _as_rgb_array(tmp_path / "c.jpg")
    assert arr.min() > 240  # no ink is white


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name,fmt", [("t.jpg", "JPEG"), ("t.png", "PNG")])
def test_truncated_refused(tmp_path: Path, name: str, fmt: str) -> None:
    path = tmp_path / name
    Image.fromarray(_noise(128, 128)).save(path, fmt)
    _truncate(path)
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_zero_byte_missing_folder_and_text(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(DataError, match="empty file") as info:
        read_image(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(DataError, match="not an image") as info:
        read_image(text)
    assert str(text) in str(info.value)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (image data is missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b""))


def test_enormous_images_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)  # 10 G pixels: Pillow's own bomb check fires
    with pytest.raises(DataError, match="too large") as info:
        read_image(bomb)
    assert str(bomb) in str(info.value)
    big = tmp_path / "big.png"
    _png_header_only(big, 9_000, 9_000)  # 81 M pixels: under Pillow's limit, over ours
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(big, max_pixels=50_000_000)
    small = tmp_path / "small.png"
    Image.fromarray(_noise()).save(small)
    with pytest.raises(DataError, match="40x48"):
        read_image(small, max_pixels=100)


def test_read_mask_nonzero_and_size_check(tmp_path: Path) -> None:
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[1, 2] = 1
    mask[4, 4] = 255
    path = tmp_path / "m_mask.png"
    Image.fromarray(mask).save(path)
    out = read_mask(path)
    assert out.dtype == bool and out.shape == (6, 5) and out.sum() == 2
    assert read_mask(path, size=(5, 6)).sum() == 2
    with pytest.raises(DataError, match=r"5x6 but its image is 6x5") as info:
        read_mask(path, size=(6, 5))
    assert str(path) in str(info.value)
    rgb = np.zeros((3, 3, 3), dtype=np.uint8)
    rgb[0, 0, 2] = 1  # a faint blue pixel still counts
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png").sum() == 1


def test_resize_mask_nearest() -> None:
    mask = np.array([[True, False], [False, False]])
    out = resize_mask(mask, (4, 6))
    assert out.shape == (6, 4) and out.dtype == bool
    assert out[:3, :2].all() and out.sum() == 6
    t = mask_to_tensor(mask, 8)
    assert t.shape == (1, 8, 8) and t.dtype == torch.float32 and set(t.unique().tolist()) == {0.0, 1.0}


def test_list_images(tmp_path: Path) -> None:
    folder = tmp_path / "my data ü"
    (folder / "sub").mkdir(parents=True)
    for name in ["b 2.png", "a ä 1.JPG", "c.tiff", "notes.txt", ".DS_Store", "._a.png", "sub/d.bmp"]:
        (folder / name).write_bytes(b"x")
    assert [p.name for p in list_images(folder)] == ["a ä 1.JPG", "b 2.png", "c.tiff"]
    everything = list_images(folder, recursive=True)
    assert [p.name for p in everything] == ["a ä 1.JPG", "b 2.png", "c.tiff", "d.bmp"]
    assert ".jpeg" in IMAGE_EXTENSIONS
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_non_ascii_path(tmp_path: Path) -> None:
    path = tmp_path / "Prüfung 試験" / "bild ä 1.png"
    path.parent.mkdir()
    Image.fromarray(_noise()).save(path)
    assert _as_rgb_array(path).shape == (48, 40, 3)


def test_to_tensor_shape_and_range() -> None:
    img = Image.new("RGB", (30, 20), (0, 128, 255))
    t = to_tensor(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    # No normalisation here: the backbone applies the statistics of its own weights.
    assert torch.allclose(t[:, 3, 5], torch.tensor([0.0, 128 / 255, 1.0]), atol=1e-6)
    white = to_tensor(Image.new("L", (7, 9), 255), 8)  # non-RGB input is converted
    assert torch.allclose(white, torch.ones(3, 8, 8))
