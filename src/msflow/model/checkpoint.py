"""Crash-safe, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A saved model is two files: ``<name>.safetensors`` (weights and buffers) and ``<name>.json`` (the
config, the msflow and schema versions, the SHA-256 of the tensor file, and whatever else the caller
stores: threshold, metrics, training state). Both are written to a temporary file, fsynced, then
renamed, so a crash leaves the previous checkpoint intact. Loading never unpickles anything and
refuses a truncated, tampered or incompatible checkpoint with a message that says which.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from msflow._version import __version__
from msflow.config import SCHEMA_VERSION, Config
from msflow.errors import CheckpointError, ConfigError
from msflow.files import atomic_write_bytes


def _read_meta(json_path: Path) -> dict[str, Any]:
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint '{json_path}' is truncated or not JSON ({err})") from err


def _write_meta(json_path: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(json_path, json.dumps(meta, indent=2, allow_nan=False).encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], stem: Path) -> None:
    """Write ``stem.safetensors`` then ``stem.json`` (the JSON last: it vouches for the tensors)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(stem.with_suffix(".safetensors"), data)
    meta = {**meta, "msflow_version": __version__, "schema_version": SCHEMA_VERSION}
    _write_meta(stem.with_suffix(".json"), {**meta, "sha256": hashlib.sha256(data).hexdigest()})


def load_tensors(stem: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a pair written by :func:`save_tensors`."""
    tensors_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for p in (json_path, tensors_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file '{p}' is missing")
    meta = _read_meta(json_path)
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise CheckpointError(f"checkpoint '{json_path}' is not an msflow checkpoint")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint '{json_path}' is from an incompatible version (schema {meta.get('schema_version')}, "
            f"msflow {meta.get('msflow_version')}); this msflow {__version__} reads schema {SCHEMA_VERSION}"
        )
    data = tensors_path.read_bytes()  # one read: the bytes that were verified are the bytes loaded
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint '{tensors_path}' is truncated or tampered with (SHA-256 mismatch)")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{tensors_path}' cannot be read: {err}") from err
    return tensors, meta


# State-dict keys renamed since run folders were first written (old pattern -> new name). The tensors
# are unchanged: only buffers that were addressed by string-built names moved into small modules.
_RENAMED_KEYS = (
    (re.compile(r"^feature_mean(\d+)$"), r"standardizers.\1.mean"),
    (re.compile(r"^feature_std(\d+)$"), r"standardizers.\1.std"),
    (re.compile(r"^fusion_flow\.perm(\d+)$"), r"fusion_flow.permutations.\1.perm"),
    (re.compile(r"^fusion_flow\.perm_inverse(\d+)$"), r"fusion_flow.permutations.\1.perm_inverse"),
)


def migrate_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a model state dict written by an older msflow to today's names.

    A renamed key never collides with an existing one: if both the old and the new name are present,
    the file is not one this code wrote, and :class:`CheckpointError` says so.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        new = key
        for pattern, replacement in _RENAMED_KEYS:
            new = pattern.sub(replacement, new)
        if new in out or (new != key and new in tensors):
            raise CheckpointError(f"checkpoint holds both the old and the new name of '{new}'")
        out[new] = value
    return out


def save_model(model: torch.nn.Module, config: Config, stem: Path, **extra: Any) -> None:
    """Save a model's full state (backbone included, so it loads offline) with its config."""
    save_tensors(model.state_dict(), {"config": config.to_dict(), **extra}, stem)


def update_meta(stem: Path, **extra: Any) -> None:
    """Add or replace entries of ``stem.json`` (atomically); the tensors and their digest are untouched."""
    json_path = stem.with_suffix(".json")
    _write_meta(json_path, {**_read_meta(json_path), **extra})


def load_model(stem: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild an :class:`~msflow.model.MSFlow` from ``stem.safetensors`` + ``stem.json``, strictly."""
    from msflow.model.msflow import MSFlow  # local import: model imports the backbone, which is heavy

    stem = Path(stem)
    if stem.is_dir():
        stem = stem / "model"
    tensors, meta = load_tensors(stem)
    try:
        # Runs saved before the image score was configurable were scored the paper's way.
        if isinstance(meta["config"].get("model"), dict):
            meta["config"]["model"].setdefault("score", "official")
        config = Config.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{stem}.json' has an invalid config: {err}") from err
    # The backbone's weights are in the file: build it without fetching anything.
    model = MSFlow(replace(config.model, pretrained=False, weights=None))
    model.config = config.model
    try:
        model.load_state_dict(migrate_state_dict(tensors), strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint '{stem}.safetensors' does not fit its config: {str(err)[:300]}"
        ) from err
    return model.to(device).eval(), config, meta
