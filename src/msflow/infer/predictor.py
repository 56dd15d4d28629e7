"""The one inference path: a model (torch, or an ONNX session) + its threshold -> verdicts with maps.

Everything that judges images (``msflow test``/``predict``, the HTTP service, the
:class:`~msflow.detector.Detector` API, the threshold calibration, the evaluation at the end of
training) runs them through a :class:`Predictor`: the forward pass, the maps resized back to each
image's original size (or kept at the model's input resolution) and the
:class:`~msflow.evaluate.threshold.Threshold`'s decision. Over a dataset it yields results batch by
batch, so memory is one batch of maps, whatever the number of images. A model trained with tiles is
run on each image's tiles and their log-likelihood maps stitched before scoring (docs/choices.md,
"Tiles for large images").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from msflow.config import Config
from msflow.data.datasets import ImageDataset, Sample
from msflow.data.images import image_size, to_tensor
from msflow.data.tiles import Stitcher, TileDataset, TileGrid, crop, grids_for, tile_grid
from msflow.device import resolve_device
from msflow.errors import MSFlowError
from msflow.evaluate.threshold import Threshold
from msflow.infer.runtime import Decision, runner, select_runtime
from msflow.logs import Progress
from msflow.model.anomaly_map import log_likelihood_maps, to_original_size, upsample
from msflow.model.checkpoint import load_model
from msflow.scoring import MapSettings

Resolution = Literal["original", "model"]


@dataclass
class Maps:
    """One image's raw model output, maps already at the requested resolution."""

    score: float  # image score (as the run's ModelConfig.score says)
    anomaly_map: np.ndarray  # (H, W) float32, the "add" map (localisation)
    image_map: np.ndarray  # (H, W) float32, the "mul" map (heatmaps, PRO)
    # at the original resolution: the same maps before the resize (evaluation reports both resolutions)
    model_anomaly_map: np.ndarray | None = None
    model_image_map: np.ndarray | None = None


@dataclass
class Prediction:
    """One image's verdict; maps are at the image's original resolution (unless asked otherwise)."""

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


class Predictor:
    """A trained model with its threshold (thread-safe: one forward pass at a time).

    Arguments:
        model: an :class:`~msflow.model.msflow.MSFlow` (``runtime="torch"`` or ``"torch-bf16"``) or an
            :class:`~msflow.infer.export.OnnxModel` (``runtime="onnx"``).
        threshold: the decision thresholds; ``None`` only for calibration (raw maps, no verdicts).
    """

    def __init__(
        self,
        model: Any,
        config: Config,
        threshold: Threshold | None,
        device: torch.device,
        runtime: str = "torch",
        meta: dict | None = None,
        runtime_decision: Decision | None = None,
    ) -> None:
        self.model, self.config, self.threshold = model, config, threshold
        self.device, self.runtime, self.meta = device, runtime, meta or {}
        self.image_size = config.model.image_size
        # The "add" map lies in [0, number of scales], the "mul" map in [0, 1] (model/anomaly_map.py).
        self.pixel_range = (0.0, float(len(config.model.num_blocks)))
        self.tile_batch = 8  # tiles per forward pass when judging decoded images
        self._lock = threading.Lock()  # torch/onnxruntime use all cores anyway
        self._run = runner(runtime, model, device)
        self.runtime_decision = runtime_decision  # what "auto" measured and chose, if it ran

    @classmethod
    def load(
        cls,
        run: str | Path,
        device: str = "auto",
        runtime: str = "torch",
        batch_size: int = 8,
        image_threshold: float | None = None,
    ) -> Predictor:
        """Load ``run`` (a run folder, or the stem of ``model.safetensors``/``model.json``).

        ``runtime``: ``torch``, ``torch-bf16``, ``onnx``, or ``auto``, the fastest of those this machine
        offers, measured at ``batch_size`` and checked against float32 torch (:mod:`msflow.infer.runtime`).
        ``image_threshold``: a raw image-score threshold in place of the calibrated one (``--threshold``).
        """
        run = Path(run)
        if not run.exists() and not run.with_suffix(".json").exists():
            raise MSFlowError(f"model '{run}' does not exist (expected a run folder from 'msflow train')")
        torch_device = resolve_device(device)
        model, config, meta = load_model(run, torch_device)
        threshold = Threshold.from_dict(meta["threshold"])
        if image_threshold is not None:
            threshold = threshold.with_image_threshold(image_threshold)
        run_dir = run if run.is_dir() else run.parent
        if config.model.tile:
            # Stitching reads the per-scale maps of the torch model; the exported graph scores one tile.
            if runtime not in ("auto", "torch"):
                raise MSFlowError(
                    f"model '{run}' judges images by tiles of {config.model.tile} px, which only the torch "
                    f"runtime stitches: use --runtime torch (not {runtime})"
                )
            runtime = "torch"
        runtime, model, decision = select_runtime(
            runtime, model, run_dir, meta["sha256"], torch_device, batch_size
        )
        return cls(model, config, threshold, torch_device, runtime, meta, decision)

    def with_settings(self, settings: MapSettings) -> Predictor:
        """A predictor of the same trained model with other map and score settings (re-scoring a run:
        ``msflow test --score/--normalization/--smoothing``, the label-free choices). Nothing is copied
        and this predictor is left as it is; the threshold stays the run's, calibrated for its own score
        (``msflow.train.fit.recalibrate_threshold`` makes one for the new settings).
        """
        if not hasattr(self.model, "with_settings"):  # an exported graph has its settings built in
            raise MSFlowError(
                f"other map or score settings need the torch runtime (this predictor runs {self.runtime})"
            )
        model = self.model.with_settings(settings)
        config = replace(self.config, model=model.config)
        return Predictor(model, config, self.threshold, self.device, self.runtime, self.meta)

    def with_threshold(self, threshold: Threshold) -> Predictor:
        """The same model and settings with other thresholds (calibrated for these settings)."""
        return Predictor(
            self.model, self.config, threshold, self.device, self.runtime, self.meta, self.runtime_decision
        )

    # -- the steps ---------------------------------------------------------------------------------
    def _maps(
        self, batch: torch.Tensor, sizes: list[tuple[int, int]], resolution: Resolution
    ) -> Iterator[Maps]:
        """Each image's :class:`Maps` from one forward pass of (B, 3, S, S) images in [0, 1]."""
        with self._lock:
            scores, pixel_maps, image_maps = self._run(batch)
        for size, score, pmap, imap in zip(sizes, scores, pixel_maps, image_maps, strict=True):
            yield _at(score, pmap, imap, size, resolution)

    # -- tiles (ModelConfig.tile) -------------------------------------------------------------------
    @property
    def tiled(self) -> bool:
        return bool(self.config.model.tile)

    def batch_log_likelihoods(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, h, w) images at the model's input size -> the model's per-scale (B, h_s, w_s)
        log-likelihood maps, float32 on the device (the torch model's, whatever runtime judges)."""
        with self._lock, torch.inference_mode():
            return [m.float() for m in log_likelihood_maps(self.model(batch.to(self.device)).zs)]

    def _tile_log_likelihoods(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) tiles -> (B, scales, h, w) log-likelihood maps at the input size (CPU float32).
        Always the torch runtime: :meth:`load` refuses any other for a tiled model."""
        size = self.model.anomaly.image_size
        with torch.inference_mode():
            return torch.stack([upsample(m, size) for m in self.batch_log_likelihoods(batch)], dim=1).cpu()

    def _stitched_maps(self, stitcher: Stitcher, resolution: Resolution) -> Maps:
        """Maps and score of one whole image from its stitched per-scale log-likelihood maps."""
        stitched = stitcher.result()  # (scales, H', W')
        logps = [m[None].to(self.device) for m in stitched]
        with torch.inference_mode():
            out = self.model.anomaly.from_log_likelihoods(logps, size=tuple(stitched.shape[-2:]))
        pmap, imap = out.pixel_map[0].float().cpu().numpy(), out.image_map[0].float().cpu().numpy()
        return _at(out.scores[0], pmap, imap, (stitcher.grid.width, stitcher.grid.height), resolution)

    def _stitched(
        self, grids: list[TileGrid], batches: Iterable[tuple[torch.Tensor, list[int]]]
    ) -> Iterator[Stitcher]:
        """Stitch batches of tiles (each tile with the index of its image's grid, image after image);
        yield each image's stitcher when its last tile is in."""
        stitcher: Stitcher | None = None
        for tiles, owners in batches:
            for maps, i in zip(self._tile_log_likelihoods(tiles), owners, strict=True):
                stitcher = stitcher or Stitcher(grids[i], tuple(maps.shape[-2:]))
                stitcher.add(maps)
                if stitcher.done:
                    yield stitcher
                    stitcher = None

    def _stitch_image(self, image: np.ndarray) -> Stitcher:
        """One decoded image's tiles, run in batches of ``tile_batch`` and stitched."""
        model = self.config.model
        grid = tile_grid(image.shape[0], image.shape[1], model.tile, model.tile_overlap)
        tiles = [to_tensor(crop(image, box), self.image_size) for box in grid.boxes()]
        step = self.tile_batch
        batches = (torch.stack(tiles[i : i + step]) for i in range(0, len(tiles), step))
        return next(self._stitched([grid], ((batch, [0] * len(batch)) for batch in batches)))

    def log_likelihoods(self, images: list[np.ndarray]) -> list[list[torch.Tensor]]:
        """Each decoded image's per-scale (1, h, w) log-likelihood maps, as the image score reads them:
        stitched over the whole image for a tiled model, the model's own maps otherwise (CPU float32)."""
        if self.tiled:
            return [[m[None] for m in self._stitch_image(im).result()] for im in images]
        return [
            [m.cpu() for m in self.batch_log_likelihoods(to_tensor(im, self.image_size)[None])]
            for im in images
        ]

    def judge(self, maps: Maps) -> Prediction:
        """The verdict on one image's maps (needs a threshold)."""
        if self.threshold is None:
            raise MSFlowError("this predictor has no threshold yet (calibration only)")
        defective = self.threshold.is_defective(maps.score)
        return Prediction(
            maps.score,
            float(self.threshold.normalize(maps.score)),
            defective,
            self.threshold.image,
            maps.anomaly_map,
            maps.image_map,
            self.threshold.defect_mask(maps.anomaly_map, defective),
        )

    # -- entry points ------------------------------------------------------------------------------
    def predict_images(self, images: list[np.ndarray]) -> list[Prediction]:
        """Judge decoded images (:func:`msflow.data.images.decode`) in one forward pass; maps at each
        image's original size."""
        if self.tiled:
            return [self.judge(self._stitched_maps(self._stitch_image(im), "original")) for im in images]
        batch = torch.stack([to_tensor(im, self.image_size) for im in images])
        return [self.judge(m) for m in self._maps(batch, [image_size(im) for im in images], "original")]

    def iter_maps(
        self,
        samples: list[Sample],
        batch_size: int = 8,
        resolution: Resolution = "original",
        workers: int = 0,
        progress: bool = True,
        desc: str = "predict",
    ) -> Iterator[Maps]:
        """Raw maps of ``samples``, in order, batch by batch (nothing is kept)."""
        if resolution not in ("original", "model"):
            raise MSFlowError(f"resolution must be 'original' or 'model', got {resolution!r}")
        if self.tiled:  # batches of tiles, stitched image after image
            grids = grids_for(samples, self.config.model.tile, self.config.model.tile_overlap)
            tiles = TileDataset(samples, grids, self.image_size)
            loader = DataLoader(tiles, batch_size=batch_size, num_workers=workers)
            stitchers = self._stitched(grids, ((b["image"], b["sample"].tolist()) for b in loader))
            maps = (self._stitched_maps(stitcher, resolution) for stitcher in stitchers)
        else:
            loader = DataLoader(
                ImageDataset(samples, self.image_size), batch_size=batch_size, num_workers=workers
            )
            maps = (m for batch in loader for m in self._maps(batch["image"], _sizes(batch), resolution))
        bar = Progress(desc=desc, total=len(samples), unit="images", enabled=progress)
        for m in maps:
            bar.update()  # before the yield: the phase is reported when its last image is out
            yield m


def _at(score: Any, pmap: np.ndarray, imap: np.ndarray, size: tuple[int, int], resolution: str) -> Maps:
    """One image's :class:`Maps` from its model-resolution maps (``size``: its original (W, H))."""
    if resolution == "model":
        return Maps(float(score), pmap, imap)
    w, h = size
    return Maps(float(score), _resized(pmap, h, w), _resized(imap, h, w), pmap, imap)


def _resized(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    if anomaly_map.shape == (height, width):
        return np.ascontiguousarray(anomaly_map, dtype=np.float32)
    return to_original_size(torch.from_numpy(np.ascontiguousarray(anomaly_map)), height, width)


def _sizes(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """The original (width, height) of each image of an :class:`ImageDataset` batch."""
    return [(int(w), int(h)) for w, h in batch["original_size"].tolist()]
