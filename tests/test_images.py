"""Tests for msflow.data.images: every odd image becomes float RGB in [0, 1], every bad file one DataError."""

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
    decode,
    image_size,
    list_images,
    read_image,
    read_mask,
    to_tensor,
    to_uint8,
)
from msflow.errors import DataError


def _noise(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_rgb_array(path: Path) -> np.ndarray:
    """The decoded image on the 8-bit scale (exact for 8-bit files)."""
    img = read_image(path)
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    assert 0 <= img.min() and img.max() <= 1
    return to_uint8(img)


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
def test_sixteen_bit_kept_at_full_precision(tmp_path: Path, dtype: str, fmt: str) -> None:
    values = np.array([[0, 257, 65535, 1000]], dtype=dtype)
    path = tmp_path / f"16.{fmt.lower()}"
    Image.fromarray(values).save(path, fmt)
    img = read_image(path)
    expected = np.array([0, 257, 65535, 1000], dtype=np.float32) / np.float32(65535)
    assert np.array_equal(img[0, :, 0], expected)  # 1000 is not a multiple of 257: no 8-bit rounding
    assert np.array_equal(img[..., 0], img[..., 2])


def test_int32_and_float_modes() -> None:
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert i32.mode == "I"
    assert decode(i32)[0, :, 0].tolist() == [0, 1, 1, 0]
    # Floating point is in [0, 1], as scikit-image and torchvision read it (not 0..255).
    f = Image.fromarray(np.array([[-3.0, 0.25, 0.5, 999.0]], dtype=np.float32))
    assert f.mode == "F"
    assert decode(f)[0, :, 1].tolist() == [0, 0.25, 0.5, 1]
    with pytest.raises(DataError, match="NaN"):
        decode(np.array([[0.1, np.nan]]))


def test_float_tiff(tmp_path: Path) -> None:
    Image.fromarray(np.full((3, 3), 0.3, dtype=np.float32)).save(tmp_path / "f.tif")
    img = read_image(tmp_path / "f.tif")
    assert img.shape == (3, 3, 3) and (img == np.float32(0.3)).all()


def test_arrays_follow_the_same_rules() -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], dtype=np.uint8)
    out = decode(rgba)
    assert np.array_equal(out, decode(Image.fromarray(rgba, "RGBA")))  # array and PIL agree
    assert to_uint8(out).tolist() == [[[200, 100, 50], [0, 0, 0]]]  # transparent -> black
    grey16 = np.array([[0, 1000]], dtype=np.uint16)
    assert decode(grey16)[0, 1].tolist() == [np.float32(1000) / np.float32(65535)] * 3
    assert decode(np.zeros((2, 3, 1), np.uint8)).shape == (2, 3, 3)
    assert image_size(decode(np.zeros((2, 3), np.uint8))) == (3, 2)
    decoded = decode(rgba)
    assert np.array_equal(decode(decoded), decoded)  # decoding a decoded image changes nothing
    for bad, match in (
        (np.zeros((2, 2, 5), np.uint8), "shape"),
        (np.zeros((2, 2), np.int64), "data type int64"),
        (np.zeros((0, 2), np.uint8), "no pixels"),
        ("not a path.png", "file not found"),
        (3, "int"),
        (b"garbage", "upload: not an image"),
    ):
        with pytest.raises(DataError, match=match):
            decode(bad)


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
    # Lanczos overshoots at a hard edge; the result stays in [0, 1] as an 8-bit resize would.
    edge = np.zeros((32, 32), np.uint8)
    edge[:, 16:] = 255
    t = to_tensor(edge, 24)
    assert t.min() == 0 and t.max() == 1


def test_to_tensor_keeps_sixteen_bit_precision() -> None:
    # Two 16-bit images that round to the same 8-bit picture still give different model inputs.
    ramp = np.linspace(20050, 20060, 64 * 64).reshape(64, 64).astype(np.uint16)
    assert np.array_equal(np.rint(ramp / 257.0), np.rint((ramp + 60) / 257.0))  # both 78 at 8 bits
    a, b = to_tensor(ramp, 16), to_tensor(ramp + 60, 16)
    assert not torch.equal(a, b)
    assert torch.allclose(b - a, torch.full_like(a, 60 / 65535), atol=2e-6)
