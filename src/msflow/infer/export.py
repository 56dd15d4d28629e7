"""ONNX export of a whole MSFlow model, and an onnxruntime-backed predictor that reads it back.

One graph holds everything :meth:`MSFlow.predict` does (backbone with its input normalisation, feature
standardisation, parallel and fusion flows, anomaly maps):

    input   images     (B, 3, S, S) float32 RGB in [0, 1]
    outputs scores     (B,)         image anomaly scores
            pixel_map  (B, S, S)    the "add" map
            image_map  (B, S, S)    the "mul" map
            normalized_score (B,)   only in exports given the run's threshold (:data:`NORMALIZED_RULE`)

The batch axis is dynamic; the image size S is fixed at export time (TF "SAME" padding, pooling to the
coarsest grid and the top-k count are computed from it). The file's ``metadata_props`` describe the input
(``preprocess``), the maps, the config (paths cut to their last part) and, from ``msflow export``, the
run's decision, so that onnxruntime alone (``get_modelmeta().custom_metadata_map``) decides exactly as
msflow does. A SHA-256 over the graph and the metadata lets :class:`OnnxModel` refuse a truncated or
altered file with one :class:`~msflow.errors.CheckpointError` line instead of giving wrong scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from msflow._version import __version__
from msflow.errors import CheckpointError, DataError, require_extra
from msflow.evaluate.threshold import Threshold
from msflow.files import atomic_write_bytes, without_paths
from msflow.model.msflow import MSFlow

INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "pixel_map", "image_map")
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.14 runs it
FORMAT = "msflow-onnx"
FORMAT_VERSION = "1"
_HASH_KEY = "msflow_sha256"
NORMALIZED_SCORE = "normalized_score"  # the optional fourth output (exports that carry a threshold)
PREPROCESS = (
    "RGB float32 in [0, 1] (8-bit values / 255), each channel resized to image_height x image_width as a "
    "float image with Pillow's Lanczos filter (mode 'F') and clipped to [0, 1]; NCHW; no mean/std "
    "(the graph normalises)"
)
DECISION_RULE = (
    "an image is defective when scores >= threshold_image; in a defective image, the defect is where "
    "pixel_map >= threshold_pixel"
)
NORMALIZED_RULE = (
    "normalized_score = clip(0.5 + (scores - threshold_image) / (score_max - score_min), 0, 1): monotone "
    "in the score, 0.5 at the threshold (score_max - score_min <= 0 counts as 1)"
)


class _PredictGraph(nn.Module):
    """``MSFlow.predict`` as a module whose forward returns a plain tuple (what the exporter wants); with
    a threshold, also the normalised score (see :data:`NORMALIZED_SCORE`)."""

    def __init__(self, model: MSFlow, threshold: Threshold | None = None) -> None:
        super().__init__()
        self.model = model
        self.threshold = threshold

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model.predict(images)
        if self.threshold is None:
            return out.scores, out.pixel_map, out.image_map
        t = self.threshold
        spread = t.score_max - t.score_min
        spread = spread if spread > 0 else 1.0  # as Threshold.normalize
        normalized = torch.clamp(0.5 + (out.scores - t.image) / spread, 0.0, 1.0)
        return out.scores, out.pixel_map, out.image_map, normalized


def _digest(model_proto: Any) -> str:
    """SHA-256 of the graph (nodes and weights), the opsets and every metadata entry but the digest."""
    h = hashlib.sha256()
    h.update(model_proto.graph.SerializeToString(deterministic=True))
    for opset in model_proto.opset_import:
        h.update(f"\0opset\0{opset.domain}\0{opset.version}".encode())
    for key, value in sorted((p.key, p.value) for p in model_proto.metadata_props if p.key != _HASH_KEY):
        h.update(f"\0{key}\0{value}".encode())
    return h.hexdigest()


def export_onnx(
    model: MSFlow,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    batch_size_dynamic: bool = True,
    metadata: Mapping[str, str] | None = None,
    threshold: Threshold | None = None,
) -> Path:
    """Export ``model.predict`` (traced on the model's device, in eval mode) to one ONNX file at ``path``,
    written atomically; returns the path.

    ``opset``: 17 (the default) to 21 were checked, 13-16 work too (LayerNorm is then spelled out in
    primitive ops). ``batch_size_dynamic=False`` fixes the batch size to 1. ``metadata``: extra entries
    (e.g. the digest of the checkpoint the export came from), covered by the file's checksum and readable
    as ``OnnxModel.metadata``. ``threshold``: the run's decision; the file then carries it in its metadata
    and has a fourth output, ``normalized_score``, so that it can be deployed without msflow.
    """
    onnx = require_extra("onnx", "onnx", "ONNX export")
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    outputs = OUTPUT_NAMES + ((NORMALIZED_SCORE,) if threshold is not None else ())
    props = {**_model_props(model, batch_size_dynamic, outputs), **_decision_props(threshold)}
    clash = sorted(set(extra) & {*props, *_DECISION_KEYS, _HASH_KEY})
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by msflow")
    path = Path(path)
    proto = onnx.load_from_string(_trace(_PredictGraph(model, threshold), outputs, opset, batch_size_dynamic))
    del proto.metadata_props[:]
    for key, value in {**props, **extra}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=_HASH_KEY, value=_digest(proto))  # last: a cut file loses it first
    proto.producer_name, proto.producer_version = "msflow", __version__
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def _trace(graph: _PredictGraph, outputs: Sequence[str], opset: int, batch_dynamic: bool) -> bytes:
    """The ONNX bytes of ``graph`` traced on a random batch, in eval mode (the model's mode is kept)."""
    model = graph.model
    height, width = model.anomaly.image_size
    device = next(model.parameters()).device
    # Trace with a batch of 2, not 1, so that no size-1 batch gets specialised into the graph.
    example = torch.rand(2 if batch_dynamic else 1, 3, height, width, device=device)
    dynamic_axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)} if batch_dynamic else None
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The image size is fixed per export, so the spatial sizes that the tracer bakes in as
            # constants (TF "SAME" padding, pooling to the coarsest grid, top-k count) are meant to be.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch >= 2.9 flags the TorchScript exporter as legacy; it is kept here on purpose (no
            # onnxscript dependency, predictable graphs).
            for message in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
                warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
            # Harmless: a strided Slice is left for onnxruntime to run instead of being folded.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()


def _model_props(model: MSFlow, batch_dynamic: bool, outputs: Sequence[str]) -> dict[str, str]:
    """The metadata that describes the graph: sizes, inputs and outputs, the maps' settings, the config."""
    height, width = model.anomaly.image_size
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "msflow_version": __version__,
        "image_size": str(height) if height == width else f"{height}x{width}",  # as --image-size reads
        "image_height": str(height),
        "image_width": str(width),
        "batch_dynamic": str(bool(batch_dynamic)).lower(),
        "inputs": INPUT_NAME,
        "outputs": ",".join(outputs),
        "preprocess": PREPROCESS,
        "normalization": str(model.anomaly.normalization),
        "smoothing": f"{model.anomaly.smoothing:g}",
        "score": str(model.anomaly.score),
        "config": json.dumps(without_paths(dataclasses.asdict(model.config)), sort_keys=True),
    }


def _decision_props(threshold: Threshold | None) -> dict[str, str]:
    """The metadata that lets a user decide without msflow (none without a threshold)."""
    if threshold is None:
        return {}
    return {
        "threshold_image": repr(float(threshold.image)),
        "threshold_pixel": repr(float(threshold.pixel)),
        "score_min": repr(float(threshold.score_min)),
        "score_max": repr(float(threshold.score_max)),
        "threshold_method": str(threshold.method),
        "decision": DECISION_RULE,
        "normalized_score": NORMALIZED_RULE,
    }


# The keys _decision_props writes: reserved in every export, with a threshold or without.
_DECISION_KEYS = frozenset(_decision_props(Threshold(0.0, 0.0, 0.0, 0.0, "", 0)))


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit] or type(err).__name__


def _read_checked(path: Path) -> tuple[bytes, dict[str, str]]:
    """The bytes and metadata of an msflow export, refused with one line when it is not one or not whole."""
    onnx = require_extra("onnx", "onnx", "the ONNX runtime")
    if not path.is_file():
        why = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"exported model '{path}' {why}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read exported model '{path}': {err}") from err
    try:
        proto = onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError, or onnx's own errors
        raise CheckpointError(
            f"exported model '{path}' is not a readable ONNX file (truncated or corrupt): {_one_line(err)}"
        ) from err
    metadata = {p.key: p.value for p in proto.metadata_props}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not an msflow ONNX export (truncated, or written by something else)"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"exported model '{path}' has format version {metadata.get('format_version')!r}; "
            f"this msflow reads {FORMAT_VERSION}"
        )
    expected = metadata.get(_HASH_KEY)
    if expected is None:
        raise CheckpointError(f"exported model '{path}' has no checksum (truncated?)")
    if _digest(proto) != expected:
        raise CheckpointError(f"exported model '{path}' fails its checksum (altered or corrupt)")
    return data, metadata


class OnnxModel:
    """Runs a model written by :func:`export_onnx` with onnxruntime: ``threads`` intra-op threads
    (``None``: its default, one per physical core), ``providers`` best first (default: CUDA when
    available, then CPU). A file that is missing, not ONNX, truncated, altered or not an msflow export
    is a :class:`~msflow.errors.CheckpointError`."""

    def __init__(
        self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        ort = require_extra("onnxruntime", "onnx", "the ONNX runtime")
        self.path = Path(path)
        data, self.metadata = _read_checked(self.path)
        try:
            self.image_shape = (int(self.metadata["image_height"]), int(self.metadata["image_width"]))
        except (KeyError, ValueError) as err:
            raise CheckpointError(
                f"exported model '{self.path}' has no valid image size in its metadata"
            ) from err
        # A side when square (as before), else (height, width): what to_tensor and the config take.
        h, w = self.image_shape
        self.image_size = h if h == w else self.image_shape

        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        best = ("CUDAExecutionProvider", "CPUExecutionProvider")  # CUDA where onnxruntime has it
        providers = providers or [p for p in best if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CheckpointError(
                f"onnxruntime cannot load exported model '{self.path}': {_one_line(err)}"
            ) from err
        names = [o.name for o in self.session.get_outputs()]
        if [i.name for i in self.session.get_inputs()] != [INPUT_NAME] or names[:3] != list(OUTPUT_NAMES):
            raise CheckpointError(f"exported model '{self.path}' does not have msflow's inputs and outputs")
        self.providers = self.session.get_providers()
        batch = self.session.get_inputs()[0].shape[0]
        self.batch_size: int | None = batch if isinstance(batch, int) else None  # None: any batch size

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 RGB in [0, 1] -> scores (B,), pixel_map (B, H, W), image_map (B, H, W)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.floating):
            raise DataError(
                f"'{self.path.name}' expects float images in [0, 1], got dtype {images.dtype} "
                "(divide by 255?)"
            )
        images = np.ascontiguousarray(images, dtype=np.float32)
        h, w = self.image_shape
        batch = "B" if self.batch_size is None else str(self.batch_size)
        batch_ok = images.ndim == 4 and images.shape[0] >= 1 and self.batch_size in (None, images.shape[0])
        if not batch_ok or images.shape[1:] != (3, h, w):
            raise DataError(
                f"'{self.path.name}' expects float images of shape ({batch}, 3, {h}, {w}), "
                f"got {tuple(images.shape)}"
            )
        scores, pixel_map, image_map = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return scores, pixel_map, image_map

    def __repr__(self) -> str:
        return f"OnnxModel('{self.path}', image_size={self.image_size}, providers={self.providers})"


__all__ = ["OnnxModel", "export_onnx"]
