"""One image decoder for every way a picture arrives: files, uploaded bytes, PIL images, numpy arrays.

The rule, the same for every entry point (so a picture gets the same score however it arrives): every
image becomes a float32 RGB array of shape (H, W, 3) with values in [0, 1].

* Integers are read on a fixed scale: 8-bit data / 255; 16-bit data (uint16, Pillow's ``I;16*``) / 65535,
  at full precision until :func:`to_tensor`; 32-bit integers (int32, Pillow's ``I``, how Pillow may
  hold a 16-bit PNG) clipped to 0..65535, / 65535. A per-image min-max scaling would give the same
  defect different brightness in different images, which a density model reads as an anomaly.
* Floating-point data is taken to be in [0, 1], as scikit-image and torchvision treat it, and clipped
  there; NaN or infinite values are refused.
* Greyscale is replicated to three channels. Alpha is composited onto **black** (colour x alpha), so
  transparent pixels look the same whatever colour the hidden values have. Palette, CMYK (no ICC colour
  management) and the other 8-bit modes use Pillow's conversion to RGB. Pillow decodes 16-bit *colour*
  PNG/TIFF files at 8 bits; pass such images as uint16 arrays to keep their precision.
* EXIF orientation is **not** applied: masks are stored in raw pixel order, and rotating the image
  but not its mask would misalign them.
* Truncated files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set; every image is
  decoded completely before use). Every problem is one :class:`DataError` line naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msflow.errors import DataError, ImageTooLargeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000

# What :func:`decode` accepts: a file path, the bytes of an encoded file, a PIL image or a numpy array.
ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Exceptions Pillow raises for a file that is not an image it can open.
_OPEN_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def _open_decoded(
    source: Path | bytes, max_pixels: int, what: str, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """A file or encoded bytes, decoded completely (file closed), or one DataError line naming ``what``
    ("image 'x.png'", "upload"); ``max_pixels`` is checked on the header, ``formats`` None tries all."""

    def fail(reason: str, error: type[DataError] = DataError) -> DataError:
        return error(f"bad {what}: {reason}")

    if isinstance(source, Path):
        if not source.exists():
            raise fail("file not found")
        if not source.is_file():
            raise fail("is a folder, not a file")
    if (source.stat().st_size if isinstance(source, Path) else len(source)) == 0:
        raise fail("empty file (0 bytes)")

    with warnings.catch_warnings():
        # We enforce our own pixel limit below; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=formats)
        except Image.DecompressionBombError as exc:
            reason = f"image too large for Pillow's decompression-bomb limit ({exc})"
            raise fail(reason, ImageTooLargeError) from None
        except _OPEN_ERRORS:
            accepted = f" (accepted: {', '.join(formats)})" if formats else ""
            raise fail(f"not an image, or an unsupported format{accepted}") from None

        with img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise fail(f"image has no pixels ({width}x{height})")
            # Checked on the header alone, so a huge image is refused before any memory is used.
            if width * height > max_pixels:
                raise fail(
                    f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}",
                    ImageTooLargeError,
                )
            try:
                img.load()
            except Image.DecompressionBombError as exc:
                raise fail(f"too many pixels ({exc})", ImageTooLargeError) from None
            except Exception as exc:  # noqa: BLE001 - corrupt files raise many exception types
                reason = str(exc)[:200] or type(exc).__name__
                raise fail(f"truncated or corrupt file, cannot decode ({reason})") from None
    return img


def _unit_range(arr: np.ndarray) -> np.ndarray:
    """Values of any accepted dtype -> float32 in [0, 1] (the rules in the module notes)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # any byte order
        return arr.astype(np.float32) / np.float32(65535)
    if arr.dtype.kind == "i" and arr.dtype.itemsize == 4:
        return np.clip(arr, 0, 65535).astype(np.float32) / np.float32(65535)
    if arr.dtype.kind == "f":
        values = arr.astype(np.float32, copy=False)  # an already decoded image is not copied
        if not np.isfinite(values).all():
            raise DataError("image holds NaN or infinite values")
        return np.clip(values, 0.0, 1.0) if values.min() < 0 or values.max() > 1 else values
    raise DataError(f"image data type {arr.dtype} is not supported (uint8, uint16, int32 or floating point)")


def _from_array(arr: np.ndarray) -> np.ndarray:
    """An (H, W) or (H, W, 1|2|3|4) array -> float32 RGB (H, W, 3) in [0, 1]."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise DataError(f"image array has shape {arr.shape}; expected (H, W) or (H, W, 1|2|3|4)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image array has no pixels (shape {arr.shape})")
    values = _unit_range(arr)
    if values.ndim == 3 and values.shape[2] in (2, 4):  # grey+alpha or RGBA: composite onto black
        values = values[:, :, :-1] * values[:, :, -1:]
    if values.ndim == 2 or values.shape[2] == 1:
        values = np.repeat(values.reshape(values.shape[0], values.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(values, dtype=np.float32)


def _pil_array(img: Image.Image) -> np.ndarray:
    """The pixel values of a decoded Pillow image, in a form :func:`_from_array` reads."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(img).astype(np.uint16)  # native byte order
    if mode in ("I", "F", "L"):
        return np.asarray(img)
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            return np.asarray(img.convert("RGBA"))
        return np.asarray(img.convert("RGB"))  # palette, CMYK, YCbCr, 1-bit, ...
    except (ValueError, OSError) as exc:
        raise DataError(f"unsupported colour mode {mode!r} ({exc})") from None


def decode(
    image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> np.ndarray:
    """Any :data:`ImageLike` as C-contiguous float32 RGB (H, W, 3) in [0, 1] (rules in the module notes).

    Files and bytes with more than ``max_pixels`` are refused from their header (Pillow itself refuses
    above about 179 M pixels). An already decoded image comes back as it is (do not modify it in
    place). Errors are one line naming the input, e.g. ``bad image 'x.png': truncated or
    corrupt file, ...``; too many pixels is an :class:`ImageTooLargeError`.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        source = Path(image) if isinstance(image, (str, os.PathLike)) else bytes(image)
        what = f"image '{source}'" if isinstance(source, Path) else "upload"
        img = _open_decoded(source, max_pixels, what, formats)
    elif isinstance(image, Image.Image):
        what, img = "image", image
    elif isinstance(image, np.ndarray):
        what, img = "image array", None
    else:
        raise DataError(f"cannot read an image from a {type(image).__name__}")
    try:
        return _from_array(_pil_array(img) if img is not None else image)
    except DataError as exc:
        raise DataError(f"bad {what}: {exc}") from None


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file read completely, as :func:`decode` does (the content decides the format)."""
    return decode(Path(path), max_pixels)


def image_size(image: np.ndarray) -> tuple[int, int]:
    """(width, height) of a decoded image, in the order Pillow and the masks use."""
    return int(image.shape[1]), int(image.shape[0])


def header_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of an image file from its header alone (nothing is decoded)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except OSError as err:
        raise DataError(f"bad image '{path}': cannot read its size ({err})") from None
    return height, width


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A decoded image as 8-bit RGB (H, W, 3) for display and overlays (rounded to the nearest level)."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask at ``shape`` (H, W) by nearest neighbours: the one rule every evaluation and every
    label-free check uses to compare a mask with a map of another size."""
    if mask.shape == tuple(shape):
        return mask
    image = Image.fromarray(mask.astype(np.uint8)).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 0


def read_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as a boolean (H, W) array: any nonzero pixel (in any colour channel) is
    defect. ``size``: the (width, height) it must have, normally its image's."""
    img = _open_decoded(Path(path), DEFAULT_MAX_PIXELS, f"mask '{Path(path)}'")
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


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders if ``recursive``), sorted, by extension
    (case-insensitive; not opened). Hidden files are skipped: macOS writes ``._name.png`` metadata
    files that carry an image extension but are not images."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"folder '{root}' does not exist or is not a folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = (p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts))


def to_tensor(image: ImageLike, size: int | tuple[int, int]) -> torch.Tensor:
    """The model input: a float32 (3, height, width) tensor resized to (size, size), or (height, width)
    = ``size``, with Lanczos, values clipped to [0, 1].

    The official MSFlow transform (no crop; non-square images are distorted) minus the normalisation,
    which the backbone applies with its weights' own statistics (``backbone.py``). Each channel is
    resized as a float image, so 16-bit and float inputs keep their precision and a picture gives the
    same tensor whatever its dtype (the clip keeps Lanczos' edge overshoot to an 8-bit resize's range).
    """
    rgb = decode(image)
    height, width = (size, size) if isinstance(size, int) else size
    lanczos = Image.Resampling.LANCZOS
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize((width, height), lanczos))
        for c in range(3)
    ]
    return torch.from_numpy(np.clip(np.stack(channels), 0.0, 1.0).astype(np.float32, copy=False))
