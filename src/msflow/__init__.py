"""msflow: MSFlow multi-scale normalizing flows for unsupervised anomaly detection."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from .detector import Detector, Prediction  # noqa: E402
from .model import FlowOutput, MSFlow  # noqa: E402

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
