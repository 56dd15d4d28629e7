"""msflow: MSFlow multi-scale normalizing flows for unsupervised anomaly detection.

Layers, lowest first (a module imports only from its own layer or lower ones):

    errors, config, scoring, logs, files, device, _version, cluster    shared basics (cluster: Ray, optional)
    model/      the network: backbone, coupling blocks, flows, anomaly maps and scores, loss, checkpoints
    data/       the image decoder, datasets, image sizing, synthetic defects
    evaluate/   metrics (exact and streaming), thresholds, reports
    infer/      the predictor (model or ONNX + threshold + decision), predict, export, serve
    train/      feature cache, training loop, torchrun data-parallel, fit, score selection, benchmark
    detector    the Python API (load / predict / fit)
    cli         the command line
"""

from __future__ import annotations

from msflow._version import __version__
from msflow.config import Config, DataConfig, ModelConfig, TrainConfig
from msflow.detector import Detector, Prediction
from msflow.model.msflow import FlowOutput, MSFlow

__all__ = [
    "Config",
    "DataConfig",
    "Detector",
    "FlowOutput",
    "MSFlow",
    "ModelConfig",
    "Prediction",
    "TrainConfig",
    "__version__",
]
