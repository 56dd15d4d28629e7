"""The Python API: load a trained run and judge new images.

    from msflow import Detector
    detector = Detector.load("runs/demo")
    result = detector.predict("part.png")        # a path, PIL image, numpy array or encoded bytes
    result.score, result.normalized_score, result.is_defective, result.anomaly_map, result.mask

``Detector.fit`` trains from Python with the same code path as ``msflow train``. ``runtime="onnx"``
runs an exported model (``model.onnx`` in the run folder) with onnxruntime instead of torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msflow.config import Config
from msflow.data.images import ImageLike, decode, image_size, to_tensor
from msflow.device import resolve_device
from msflow.errors import MSFlowError
from msflow.evaluate.threshold import Threshold
from msflow.model.anomaly_map import to_original_size
from msflow.model.checkpoint import load_model


@dataclass
class Prediction:
    """One image's verdict; maps are at the image's original resolution."""

    score: float  # raw image score (as the run's ModelConfig.score says; "official": the paper's)
    normalized_score: float  # in [0, 1]; the threshold is at 0.5
    is_defective: bool
    threshold: float  # the raw image threshold used
    anomaly_map: np.ndarray  # (H, W) float32, the "add" map (localisation)
    image_map: np.ndarray  # (H, W) float32, the "mul" map (for heatmap overlays)
    mask: np.ndarray  # (H, W) bool, the predicted defect region (empty when judged good)

    def summary(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "normalized_score": self.normalized_score,
            "decision": "defective" if self.is_defective else "good",
            "threshold": self.threshold,
            "defect_pixels": int(self.mask.sum()),
        }


class Detector:
    """A trained MSFlow model with its threshold, ready to judge images (thread-safe)."""

    def __init__(
        self,
        model: Any,
        config: Config,
        threshold: Threshold,
        meta: dict,
        device: torch.device,
        runtime: str = "torch",
    ) -> None:
        self.model, self.config, self.threshold, self.meta = model, config, threshold, meta
        self.device, self.runtime = device, runtime
        self.image_size = config.model.image_size
        self._lock = threading.Lock()  # one forward at a time; torch/onnxruntime use all cores anyway

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", runtime: str = "torch") -> Detector:
        """Load ``run`` (a run folder, or the stem of ``model.safetensors``/``model.json``)."""
        run = Path(run)
        if not run.exists() and not run.with_suffix(".json").exists():
            raise MSFlowError(f"model '{run}' does not exist (expected a run folder from 'msflow train')")
        torch_device = resolve_device(device)
        model, config, meta = load_model(run, torch_device)
        threshold = Threshold.from_dict(meta["threshold"])
        if runtime == "onnx":
            from msflow.infer.export import OnnxModel

            onnx_path = (run if run.is_dir() else run.parent) / "model.onnx"
            if not onnx_path.is_file():
                raise MSFlowError(f"no '{onnx_path}': run 'msflow export --model {run}' first")
            model = OnnxModel(onnx_path)
            if model.metadata.get("checkpoint_sha256") != meta["sha256"]:
                raise MSFlowError(
                    f"'{onnx_path}' was not exported from this model; run 'msflow export' again"
                )
        elif runtime != "torch":
            raise MSFlowError(f"runtime must be 'torch' or 'onnx', got '{runtime}'")
        return cls(model, config, threshold, meta, torch_device, runtime)

    @staticmethod
    def fit(dataset: str, output: str | Path, config: Config | None = None, **overrides: dict) -> Detector:
        """Train on ``dataset`` (a category folder or ``elpv:mono``) into the run folder ``output``.

        ``overrides`` are config sections, e.g. ``train={"epochs": 5}, model={"image_size": 256}``.
        """
        from msflow.train.fit import fit

        cfg = (config or Config()).updated(data={"dataset": str(dataset)}, **overrides)
        fit(cfg, output, progress=False)
        return Detector.load(output)

    def _forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if self.runtime == "onnx":
                return self.model.predict(batch.numpy())
            with torch.inference_mode():
                out = self.model.predict(batch.to(self.device))
            return (
                out.scores.float().cpu().numpy(),
                out.pixel_map.float().cpu().numpy(),
                out.image_map.float().cpu().numpy(),
            )

    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        """Judge several images in one forward pass."""
        decoded = [decode(im) for im in images]
        batch = torch.stack([to_tensor(im, self.image_size) for im in decoded])
        scores, pixel_maps, image_maps = self._forward(batch)
        results = []
        for im, score, pmap, imap in zip(decoded, scores, pixel_maps, image_maps, strict=True):
            w, h = image_size(im)
            pmap, imap = (
                to_original_size(torch.from_numpy(np.ascontiguousarray(m)), h, w) for m in (pmap, imap)
            )
            defective = bool(score >= self.threshold.image)
            mask = (pmap >= self.threshold.pixel) if defective else np.zeros((h, w), bool)
            results.append(
                Prediction(
                    float(score),
                    float(self.threshold.normalize(score)),
                    defective,
                    self.threshold.image,
                    pmap,
                    imap,
                    mask,
                )
            )
        return results

    def predict(self, image: ImageLike) -> Prediction:
        """Judge one image: a path, a PIL image or a numpy array."""
        return self.predict_batch([image])[0]

    def set_threshold(self, value: float) -> None:
        """Override the stored image threshold (raw score units)."""
        self.threshold = self.threshold.with_image_threshold(value)
