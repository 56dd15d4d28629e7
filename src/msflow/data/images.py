"""Robust image and mask I/O: every problem becomes one :class:`DataError` line naming the file.

Decisions worth knowing (they make scores comparable across images):

* Every image is returned as 8-bit RGB. Greyscale is replicated to three channels.
* Alpha (RGBA, LA, PA, palette transparency) is composited onto **black**, so transparent
  pixels look the same in every image whatever colour the hidden RGB values happen to have.
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``) and 32-bit integer (``I``) images are
  divided by 257, i.e. 0..65535 maps linearly onto 0..255. A per-image max scaling would
  give the same defect different brightness in different images, which a density model
  would read as an anomaly. ``I`` images are assumed to hold 16-bit values (clipped).
* Float images (``F``) are clipped to 0..255, again a fixed mapping (min-max per image
  would not be consistent). Float data in 0..1 must be rescaled by the user beforehand.
* CMYK uses Pillow's plain conversion (no ICC colour management).
* EXIF orientation is **not** applied: masks are stored in raw pixel order, and rotating
  the image but not its mask would misalign them.
* Truncated files are refused: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set,
  and every image is decoded completely (``img.load()``) before it is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from msflow.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open_decoded(path: str | os.PathLike[str], max_pixels: int, what: str) -> Image.Image:
    """Open ``path`` and decode it completely, or raise one DataError line.

    Args:
        path: Image file.
        max_pixels: Largest accepted width*height, checked before decoding.
        what: "image" or "mask", used in the message.

    Returns:
        The fully loaded Pillow image (file handle already closed).
    """
    p = Path(path)

    def fail(reason: str) -> DataError:
        return DataError(f"bad {what} '{p}': {reason}")

    if not p.exists():
        raise fail("file not found")
    if not p.is_file():
        raise fail("is a folder, not a file")
    if p.stat().st_size == 0:
        raise fail("empty file (0 bytes)")

    with warnings.catch_warnings():
        # We enforce our own pixel limit below; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(p)
        except Image.DecompressionBombError as exc:
            raise fail(f"image too large for Pillow's decompression-bomb limit ({exc})") from None
        except UnidentifiedImageError:
            raise fail("not an image, or an unsupported format") from None
        except OSError as exc:
            raise fail(f"cannot open ({exc})") from None

    with img:
        width, height = img.size
        # Checked on the header alone, so a huge image is refused before any memory is used.
        if width * height > max_pixels:
            raise fail(f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}")
        if width == 0 or height == 0:
            raise fail(f"image has no pixels ({width}x{height})")
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many exception types
            reason = str(exc) or type(exc).__name__
            raise fail(f"truncated or corrupt file, cannot decode ({reason})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any common mode to 8-bit RGB (see module notes).

    Args:
        img: A loaded Pillow image.

    Returns:
        A new image in mode "RGB".

    Raises:
        DataError: For a colour mode that cannot be converted.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(black, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"unsupported colour mode {mode!r} ({exc})") from None


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file completely and return it as 8-bit RGB.

    Args:
        path: A .jpg/.jpeg/.png/.bmp/.tif/.tiff file (the content decides the format).
        max_pixels: Images with more pixels are refused before decoding. Pillow itself
            refuses images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 M pixels).

    Returns:
        A Pillow image in mode "RGB".

    Raises:
        DataError: e.g. ``bad image 'x.png': truncated or corrupt file, cannot decode (...)``.
    """
    img = _open_decoded(path, max_pixels, "image")
    try:
        return to_rgb(img)
    except DataError as exc:
        raise DataError(f"bad image '{Path(path)}': {exc}") from None


def read_mask(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a ground-truth mask: any nonzero pixel (in any colour channel) is defect.

    Args:
        path: Mask image file (usually PNG, black background).
        size: Expected (width, height), normally the size of the mask's image.
        max_pixels: As for :func:`read_image`.

    Returns:
        Boolean array of shape (H, W).

    Raises:
        DataError: If the file is unreadable or its size differs from ``size``. Use
            :func:`resize_mask` if resizing is what you want.
    """
    img = _open_decoded(path, max_pixels, "mask")
    if size is not None and tuple(img.size) != tuple(size):
        raise DataError(
            f"mask '{Path(path)}' is {img.size[0]}x{img.size[1]} but its image is {size[0]}x{size[1]} (WxH)"
        )
    if img.mode == "P":
        # Judge palette masks by their colours, as a viewer sees them, not by index.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        if img.mode.endswith(("A", "a")):
            arr = arr[..., :-1]  # alpha says nothing about defects
        arr = arr.any(axis=-1)
    return np.asarray(arr != 0, dtype=bool)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a boolean (H, W) mask to ``size`` = (width, height) with nearest neighbour.

    Args:
        mask: Boolean or 0/nonzero array of shape (H, W).
        size: Target (width, height).

    Returns:
        Boolean array of shape (height, width).
    """
    img = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    return np.asarray(img.resize(tuple(size), Image.Resampling.NEAREST)) > 0


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """List the image files in ``folder``, sorted, by extension (case-insensitive).

    Hidden files are skipped: macOS writes ``._name.png`` metadata files that carry an
    image extension but are not images.

    Args:
        folder: Folder to list.
        recursive: Also list sub-folders.

    Returns:
        Sorted list of paths. Files are not opened here (see ``validate_samples``).

    Raises:
        DataError: If ``folder`` does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"folder '{root}' does not exist or is not a folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    ]
    return sorted(found)


def _height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_tensor(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize to (size, size), or (height, width) = ``size``, with LANCZOS; scale to 0..1 (RGB, float32).

    This is the official MSFlow transform (no crop; non-square images are distorted) minus the
    normalisation, which the backbone applies itself with the statistics its weights were trained
    with (ImageNet for the ResNets, [-1, 1] for EfficientNet-Lite0); see ``backbone.py``.

    Args:
        image: A Pillow image (converted to RGB if needed).
        size: Output side length in pixels, or (height, width).

    Returns:
        Float32 tensor of shape (3, height, width).
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    height, width = _height_width(size)
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-resize a boolean mask to (size, size) or (height, width); a (1, height, width) 0/1 tensor."""
    height, width = _height_width(size)
    resized = resize_mask(mask, (width, height))
    return torch.from_numpy(resized.astype(np.float32))[None]
