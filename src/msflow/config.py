"""One typed configuration, validated once, saved in every run folder and checkpoint.

Each default names its source: "spec" is ../shared/docs/msflow-spec.md (the official code), "ours" a
choice of msflow with the reason next to it. Closed options are ``Literal`` and checked in
``__post_init__``; unknown keys in a dict or YAML file are errors, never silently ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from msflow.errors import ConfigError

SCHEMA_VERSION = 1  # bump when a saved config or checkpoint can no longer be read by this code


def _check_literals(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        allowed = get_args(hints[f.name]) if getattr(hints[f.name], "__origin__", None) is Literal else None
        if allowed and getattr(obj, f.name) not in allowed:
            raise ConfigError(f"{f.name}={getattr(obj, f.name)!r} is not one of {list(allowed)}")


SCORE_KINDS = ("mul", "gmul", "add", "logp")  # the maps an image score can reduce; see model/anomaly_map.py


def parse_score(value: Any) -> str:
    """Canonical image-score name: "official", "auto", or "KIND:FRACTION" / "KIND:max".

    KIND is one of ``SCORE_KINDS``; FRACTION in (0, 1] is the share of the map's largest values that are
    averaged ("max" = the single largest). A bare KIND means the paper's fraction, 0.03.
    """
    text = str(value).strip().lower()
    if text in ("official", "auto"):
        return text
    kind, _, fraction = text.partition(":")
    if kind not in SCORE_KINDS:
        raise ConfigError(
            f"score {value!r} is not official, auto or one of {list(SCORE_KINDS)}[:FRACTION|max]"
        )
    if fraction in ("", "max"):
        return f"{kind}:{fraction or '0.03'}"
    try:
        share = float(fraction)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ConfigError(f"score {value!r}: the fraction must be in (0, 1] or 'max'")
    return f"{kind}:{share:g}"


AUTO_SIZE_BUDGET = 256  # ours: the side of the square pixel budget of "auto" (a 256 x 256 input's cost)


def parse_image_size(value: Any) -> int | tuple[int, int] | str:
    """Canonical image size: an int (square), an (H, W) tuple (not square) or "auto:N" (unresolved).

    Accepts 256, "256", "208x512", [208, 512], (208, 512), "auto" and "auto:320". Each side must be a
    multiple of 16 in [32, 2048]: the backbone's stride-16 stage then has whole cells (multiples of 32,
    the coarsest pooled scale, let the fusion flow pool evenly; others pool adaptively).
    """
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text is not None and (text == "auto" or text.startswith("auto:")):
        budget = text.partition(":")[2] or str(AUTO_SIZE_BUDGET)
        if not budget.isdigit() or not 32 <= int(budget) <= 2048:
            raise ConfigError(f"image_size {value!r}: 'auto:N' needs a pixel budget N in [32, 2048]")
        return f"auto:{int(budget)}"
    try:
        if text is not None:
            parts = [int(p) for p in text.split("x")]
        elif isinstance(value, (list, tuple)):
            parts = [int(p) for p in value] if len(value) == 2 else []
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            raise ValueError
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"image_size must be N, HxW (e.g. 208x512), [H, W] or auto[:N], got {value!r}"
        ) from None
    for side in parts:
        if not 32 <= side <= 2048 or side % 16:
            raise ConfigError(f"image_size sides must be multiples of 16 in [32, 2048], got {value!r}")
    return parts[0] if parts[0] == parts[1] else (parts[0], parts[1])


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: everything needed to rebuild it from a checkpoint."""

    # ours: EfficientNet-Lite0 ships its ImageNet weights with pip, so the default works offline.
    # The paper's backbone is "wide_resnet50_2" (spec section 1).
    backbone: Literal["wide_resnet50_2", "resnet18", "efficientnet_lite0"] = "efficientnet_lite0"
    pretrained: bool = True  # ours: never fall back to random weights; False only when asked
    weights: str | None = None  # ours: a local backbone weights file, for machines without internet
    reflect_padding: bool = True  # spec section 1: the official ResNet's reflect padding
    # spec section 1: 512 x 512 for every class. Ours: also height x width, "(H, W)" or "HxW" (kept as
    # an int when square, so square configs and checkpoints are unchanged), or "auto[:N]": the training
    # images' median aspect ratio within N*N pixels (N defaults to 256), resolved by ``msflow train``
    # before the model is built (see ``msflow.data.sizing``) and saved resolved in the run folder.
    image_size: int | tuple[int, int] | str = 512
    pool: Literal["avg", "max", "none"] = "avg"  # spec section 1: AvgPool2d(3, 2, 1)
    num_blocks: tuple[int, int, int] = (2, 5, 8)  # spec section 2: asymmetric parallel flows
    cond_channels: int = 64  # spec section 2.4: positional-encoding channels
    clamp_alpha: float = 1.9  # spec sections 2.1 and 3.1
    clamp: Literal["freia02", "freia_new"] = "freia02"  # spec section 2.3: the formula MSFlow ran
    # ours: "auto" standardises each feature channel with training-set statistics for backbones
    # whose raw stage outputs are large (EfficientNet-Lite0), and keeps the official raw features
    # ("none") for the ResNets, for parity. "channel" forces standardisation.
    feature_norm: Literal["auto", "none", "channel"] = "auto"
    top_k: float = 0.03  # spec section 6: image score = mean of the top 3 % of the "mul" map
    # ours: how the maps become one image score (model/anomaly_map.py). "official" is the paper's (top_k
    # of the "mul" map as ``normalization`` normalises it). The default, the mean of the top 1 % of the
    # raw negative log-likelihood, won on held-out good images vs synthetic defects on every dataset
    # measured (README "Image size, scoring and tiles"), never chosen from test labels; "auto" lets
    # ``msflow train`` choose per dataset the same way and records the evidence.
    score: str = "logp:0.01"
    # spec section 6 / B15: "per_image" is the official normalisation; "global" uses training statistics
    normalization: Literal["per_image", "global"] = "per_image"
    seed: int = 9826  # spec section 5; also draws the fixed permutations, so models are reproducible

    def __post_init__(self) -> None:
        _check_literals(self)
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        if len(self.num_blocks) != 3 or min(self.num_blocks) < 1:
            raise ConfigError(f"num_blocks must be three positive counts, got {self.num_blocks}")
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        object.__setattr__(self, "score", parse_score(self.score))
        if self.cond_channels % 4 or self.cond_channels < 4:
            raise ConfigError(f"cond_channels must be a positive multiple of 4, got {self.cond_channels}")
        if not 0 < self.top_k <= 1:
            raise ConfigError(f"top_k must be in (0, 1], got {self.top_k}")
        if self.clamp_alpha <= 0:
            raise ConfigError(f"clamp_alpha must be positive, got {self.clamp_alpha}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input; an unresolved "auto" size is an error here."""
        if isinstance(self.image_size, str):
            raise ConfigError(
                f"image_size={self.image_size!r} must be resolved from the training images first"
            )
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return self.image_size

    @property
    def standardize_features(self) -> bool:
        if self.feature_norm == "auto":
            return self.backbone == "efficientnet_lite0"
        return self.feature_norm == "channel"


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from."""

    dataset: str = "elpv:mono"  # ours: a folder in MVTec/VisA layout, or the built-in "elpv:mono|poly"
    # ours: good training images held out (never trained on) to calibrate the decision threshold
    holdout_fraction: float = 0.1
    workers: int = 0  # ours: features are cached once, so loader workers rarely pay off on a CPU

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 0.9:
            raise ConfigError(f"holdout_fraction must be in [0, 0.9), got {self.holdout_fraction}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class TrainConfig:
    """How the flows are trained (spec section 5)."""

    epochs: int = 100  # spec: 25 meta epochs x 4 sub-epochs
    batch_size: int = 8  # spec B4: the official CLI's effective batch
    lr: float = 1e-4  # spec: Adam, no weight decay
    # spec: LinearLR 0.1 -> 1 over 12 of the 100 epochs, and MultiStepLR at epochs 70 and 90. Both are
    # fractions of ``epochs`` here (ours), so a shorter schedule warms up and decays at the same
    # relative points; at the paper's 100 epochs they are exactly 12, 70 and 90.
    warmup: float = 0.12
    warmup_from: float = 0.1  # spec
    decay_at: tuple[float, ...] = (0.7, 0.9)
    decay_gamma: float = 0.33  # spec
    grad_clip: float = 2.0  # spec: clip_grad_norm_ max_norm 2
    seed: int = 9826  # spec
    amp: bool = True  # spec offers AMP (float16 + GradScaler); ours: on by default on CUDA
    # ours: bfloat16 autocast of the flows on the CPU, off by default (float32 is the reference). On
    # CPUs with bf16 matrix units (Intel AMX, avx512_bf16) a training step is ~2.5x faster; the loss
    # stays within 1e-3 relative of float32 (tests/test_training.py).
    cpu_bf16: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    eval_every: int = 0  # ours: evaluate every N epochs for the log only; 0 = only at the end (spec B14)
    cache: Literal["auto", "memory", "disk"] = "auto"  # ours: where the cached features live
    max_bad_steps: int = 5  # ours: non-finite losses tolerated (each rolls back and lowers the lr)
    checkpoint_every: int = 1  # ours: epochs between crash-safe checkpoints

    def __post_init__(self) -> None:
        _check_literals(self)
        object.__setattr__(self, "decay_at", tuple(float(d) for d in self.decay_at))
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"lr and grad_clip must be positive, got {self.lr}, {self.grad_clip}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction of the schedule in [0, 1), got {self.warmup}")
        if any(not 0 < d <= 1 for d in self.decay_at):
            raise ConfigError(f"decay_at must be fractions of the schedule in (0, 1], got {self.decay_at}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"]["num_blocks"] = list(self.model.num_blocks)
        if isinstance(self.model.image_size, tuple):
            out["model"]["image_size"] = list(self.model.image_size)
        out["train"]["decay_at"] = list(self.train.decay_at)
        out["schema_version"] = SCHEMA_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"config schema version {version} is not supported (this msflow reads {SCHEMA_VERSION})"
            )
        unknown = set(data) - {"model", "data", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
        parts = {}
        for name, klass in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"config section '{name}' must be a mapping")
            known = {f.name for f in fields(klass)}
            bad = set(section) - known
            if bad:
                raise ConfigError(f"unknown key(s) in '{name}': {sorted(bad)}; known: {sorted(known)}")
            try:
                parts[name] = klass(**section)
            except TypeError as err:
                raise ConfigError(f"bad value in '{name}': {err}") from err
        return cls(**parts)

    def updated(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields replaced, e.g. ``cfg.updated(train={"epochs": 5})``; validated again."""
        merged = self.to_dict()
        for name, values in sections.items():
            merged.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
        return Config.from_dict(merged)


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping")
    return Config.from_dict(data)


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "load_yaml",
    "save_yaml",
    "replace",
]
