"""One exception type for every problem a user can fix (bad file, bad value, bad checkpoint).

The command line catches :class:`MSFlowError` and prints its message as one line, never a traceback.
"""

from __future__ import annotations


class MSFlowError(Exception):
    """A user-facing error: the message names the file or value at fault and what is wrong."""


class DataError(MSFlowError, ValueError):
    """An image, mask or dataset folder that cannot be used."""


class CheckpointError(MSFlowError, ValueError):
    """A checkpoint or exported model that is missing, truncated, tampered with or incompatible."""


class WeightsError(MSFlowError, RuntimeError):
    """Backbone weights that cannot be had (no internet, missing file, wrong keys)."""


class ConfigError(MSFlowError, ValueError):
    """A configuration value or key that is not valid."""


class TrainingError(MSFlowError, RuntimeError):
    """Training cannot go on (e.g. the loss keeps turning non-finite)."""


class ImageTooLargeError(DataError):
    """An image with more pixels than the configured limit (the service answers 413, not 415)."""


class DistributedError(MSFlowError, RuntimeError):
    """A data-parallel job cannot go on: another rank died or a collective timed out."""


def missing_extra(module: str, extra: str, feature: str) -> MSFlowError:
    """The one-line error for an optional part that is not installed: it names the ``pip install``."""
    return MSFlowError(
        f'{feature} needs {module.split(".")[0]}, which is not installed: pip install "msflow[{extra}]"'
    )


def require_extra(module: str, extra: str, feature: str):
    """``module`` imported, or :func:`missing_extra`'s error (the optional parts of msflow, the HTTP
    service and ONNX, are pip extras; ``feature`` says what needed the missing one, e.g. "msflow serve")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module, extra, feature) from None


class StoppedError(MSFlowError):
    """The run was asked to stop (SIGTERM); its checkpoint is on disk and ``--resume`` continues it."""

    exit_code = 143  # 128 + SIGTERM: what a process ended by SIGTERM reports, so launchers restart it
