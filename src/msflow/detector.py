"""The Python API: load a trained run and judge new images.

    from msflow import Detector
    detector = Detector.load("runs/demo")
    result = detector.predict("part.png")        # a path, PIL image, numpy array or encoded bytes
    result.score, result.normalized_score, result.is_defective, result.anomaly_map, result.mask

``Detector.fit`` trains from Python with the same code path as ``msflow train``. ``runtime`` is
``--runtime`` of ``msflow predict``: "auto" (the default) times this machine's runtimes at batch 1 and
uses the fastest that agrees with float32 torch (docs/choices.md, "Runtimes").
"""

from __future__ import annotations

from pathlib import Path

from msflow.config import Config
from msflow.data.images import ImageLike, decode
from msflow.infer.predictor import Prediction, Predictor

__all__ = ["Detector", "ImageLike", "Prediction"]


class Detector:
    """A trained MSFlow model with its threshold, ready to judge images (thread-safe): the
    :class:`~msflow.infer.predictor.Predictor` of every entry point, plus input decoding and training."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    # The predictor's state, under the names this API has always had.
    model = property(lambda self: self.predictor.model)
    config = property(lambda self: self.predictor.config)
    meta = property(lambda self: self.predictor.meta)
    device = property(lambda self: self.predictor.device)
    runtime = property(lambda self: self.predictor.runtime)
    image_size = property(lambda self: self.predictor.image_size)
    threshold = property(lambda self: self.predictor.threshold)

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", runtime: str = "auto") -> Detector:
        """Load ``run`` (a run folder, or the stem of ``model.safetensors``/``model.json``)."""
        return cls(Predictor.load(run, device, runtime, batch_size=1))

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
        return self.predictor.predict_images([decode(im) for im in images])

    def predict(self, image: ImageLike) -> Prediction:
        """Judge one image: a path, a PIL image, a numpy array or encoded bytes."""
        return self.predict_batch([image])[0]

    def set_threshold(self, value: float) -> None:
        """Override the stored image threshold (raw score units)."""
        self.predictor.threshold = self.predictor.threshold.with_image_threshold(value)
