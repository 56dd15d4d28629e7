"""The Python API: load a trained run and judge new images.

    from msflow import Detector
    detector = Detector.load("runs/demo")
    result = detector.predict("part.png")        # a path, a PIL image or an (H, W[, C]) numpy array
    result.score, result.normalized_score, result.is_defective, result.anomaly_map, result.mask

``Detector.fit`` trains from Python with the same code path as ``msflow train``. ``runtime="onnx"``
runs an exported model (``model.onnx`` in the run folder) with onnxruntime instead of torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from msflow.config import Config
from msflow.data.images import read_image, to_rgb
from msflow.errors import DataError
from msflow.evaluate.threshold import Threshold
from msflow.infer.predictor import Prediction, Predictor

ImageLike = str | Path | Image.Image | np.ndarray

__all__ = ["Detector", "Prediction", "as_pil"]


def as_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or numpy array (grey, RGB or RGBA; uint8, uint16 or float in [0, 1]) -> RGB."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise DataError(f"image array has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
        if arr.dtype == np.uint16:
            arr = (arr // 257).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise DataError(f"image array has dtype {arr.dtype}; expected uint8, uint16 or float")
        return to_rgb(Image.fromarray(arr))
    raise DataError(f"cannot read an image from a {type(image).__name__}")


class Detector:
    """A trained MSFlow model with its threshold, ready to judge images (thread-safe).

    A thin front over :class:`~msflow.infer.predictor.Predictor`, which does the work for every entry
    point (CLI, service, evaluation); this class adds the input conversion of paths, PIL images and
    arrays, and training from Python.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    # The predictor's state, under the names this API has always had.
    model = property(lambda self: self.predictor.model)
    config = property(lambda self: self.predictor.config)
    meta = property(lambda self: self.predictor.meta)
    device = property(lambda self: self.predictor.device)
    runtime = property(lambda self: self.predictor.runtime)
    image_size = property(lambda self: self.predictor.image_size)

    @property
    def threshold(self) -> Threshold:
        return self.predictor.threshold

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", runtime: str = "torch") -> Detector:
        """Load ``run`` (a run folder, or the stem of ``model.safetensors``/``model.json``)."""
        return cls(Predictor.load(run, device, runtime))

    @staticmethod
    def fit(dataset: str, output: str | Path, config: Config | None = None, **overrides: dict) -> Detector:
        """Train on ``dataset`` (a category folder or ``elpv:mono``) into the run folder ``output``.

        ``overrides`` are config sections, e.g. ``train={"epochs": 5}, model={"image_size": 256}``.
        """
        from msflow.train.fit import fit

        cfg = (config or Config()).updated(data={"dataset": str(dataset)}, **overrides)
        fit(cfg, output, progress=False)
        return Detector.load(output)

    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        """Judge several images in one forward pass."""
        return self.predictor.predict_images([as_pil(im) for im in images])

    def predict(self, image: ImageLike) -> Prediction:
        """Judge one image: a path, a PIL image or a numpy array."""
        return self.predict_batch([image])[0]

    def set_threshold(self, value: float) -> None:
        """Override the stored image threshold (raw score units)."""
        self.predictor.threshold = self.predictor.threshold.with_image_threshold(value)
