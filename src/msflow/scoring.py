"""What an image score and a map setting mean: names, parsing, candidates and incumbents (no torch).

Every part of msflow that names a score or a map setting reads it here; ``msflow.model.anomaly_map``
computes what a :class:`MapSettings` value says (the formulas of the map kinds live there) and the
label-free choices (``msflow.train.choice``) judge the candidates listed here against the incumbents.

A score name is ``KIND:FRACTION[@SIGMA]``: KIND is the map it reduces (:data:`SCORE_KINDS`), FRACTION
the share of the map's largest values that are averaged (of ONE model input's area) or ``max``, the
single largest value, and ``@SIGMA`` (optional) blurs that map with a Gaussian of SIGMA model-input
pixels instead of the run's map smoothing: ``logp:max@4`` is the verdict of PaDiM-style detectors (PaDiM
blurs with sigma 4 at 256 px). ``official`` is the paper's score, the top ``top_k`` of the "mul" map
under the run's normalisation (:meth:`MapSettings.score_name`); ``auto`` is left to training
(:meth:`MapSettings.resolved`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from msflow.errors import ConfigError

SCORE_KINDS = ("mul", "gmul", "add", "logp", "scales")
NORMALIZATIONS = ("per_image", "global")
FRACTIONS = ("0.1", "0.03", "0.01", "0.001", "max")
# Gaussian sigmas (model-input pixels) that --smoothing auto chooses from; 0 is the paper's maps.
SMOOTHING_CANDIDATES = (0.0, 2.0, 4.0, 8.0)

# The incumbents: what "auto" keeps unless a challenger wins under the rule of msflow.train.choice.
# Maps: the paper's (each image against its own maximum, no blur). The score: logp:0.03, the paper's
# share of the summed log-likelihood instead of the product of the scales' probabilities; why (measured
# on real defects): docs/choices.md, "Image score".
MAPS_INCUMBENT = ("per_image", 0.0)
SCORE_INCUMBENT = "logp:0.03"

# Scores built on the maps themselves (issue 20): blurred-map maxima (PaDiM's verdict), a blurred
# top 1 %, and per-scale reductions (a defect that one scale sees is not diluted by the others).
MAP_SCORES = ("logp:max@4", "logp:max@8", "logp:0.01@4", "add:max@4", "scales:max@4", "scales:0.01")
SCORE_CANDIDATES = (
    "official",
    *(f"{kind}:{f}" for kind in ("mul", "gmul", "add", "logp") for f in FRACTIONS),
    *MAP_SCORES,
)


def parse_smoothing(value: Any) -> float | str:
    """A map-smoothing setting: "auto" or a Gaussian sigma >= 0 in model-input pixels (0 = off)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"smoothing {value!r} is not a sigma in pixels (0 = off) or auto") from None
    if not 0 <= sigma <= 64:  # NaN fails every comparison, so it is refused here too
        raise ConfigError(f"smoothing must be auto or a sigma in [0, 64] pixels, got {value!r}")
    return sigma


def _number(text: str) -> float:
    """``text`` as a float; -1 (out of every range here) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return -1.0


def parse_score(value: Any) -> str:
    """Canonical image-score name: "official", "auto", or ``KIND:FRACTION[@SIGMA]`` (module doc).

    A bare KIND means the paper's fraction, 0.03.
    """
    text = str(value).strip().lower()
    if text in ("official", "auto"):
        return text
    head, at, blur = text.partition("@")
    kind, _, fraction = head.partition(":")
    if kind not in SCORE_KINDS:
        raise ConfigError(
            f"score {value!r} is not official, auto or one of {list(SCORE_KINDS)}[:FRACTION|max][@SIGMA]"
        )
    if fraction not in ("", "max"):
        if not 0 < (share := _number(fraction)) <= 1:
            raise ConfigError(f"score {value!r}: the fraction must be in (0, 1] or 'max'")
        fraction = f"{share:g}"
    name = f"{kind}:{fraction or '0.03'}"
    if not at:
        return name
    if not 0 <= (sigma := _number(blur)) <= 64:
        raise ConfigError(f"score {value!r}: @SIGMA must be a blur in [0, 64] model-input pixels")
    return f"{name}@{sigma:g}"


def split_score(name: str) -> tuple[str, str, float | None]:
    """(kind, fraction or "max", own blur sigma or None) of a canonical ``KIND:FRACTION[@SIGMA]`` name."""
    head, at, blur = name.partition("@")
    kind, _, fraction = head.partition(":")
    return kind, fraction, float(blur) if at else None


@dataclass(frozen=True)
class MapSettings:
    """How latents become maps and a score: one immutable value (``ModelConfig.maps`` makes it)."""

    normalization: str = "per_image"  # the paper's; "global" (training references) or "auto"
    smoothing: float | str = 0.0  # Gaussian sigma (model-input pixels) on every map, 0 = the paper, or "auto"
    score: str = "official"  # a score name (module doc), "official" or "auto"
    top_k: float = 0.03  # the fraction of the "mul" map that "official" averages

    def __post_init__(self) -> None:
        if self.normalization not in (allowed := [*NORMALIZATIONS, "auto"]):
            raise ConfigError(f"normalization {self.normalization!r} is not one of {allowed}")
        object.__setattr__(self, "smoothing", parse_smoothing(self.smoothing))
        object.__setattr__(self, "score", parse_score(self.score))
        if not 0 < self.top_k <= 1:
            raise ConfigError(f"top_k must be in (0, 1], got {self.top_k}")

    def resolved(self) -> MapSettings:
        """These settings with every ``auto`` that training has not decided replaced by its incumbent:
        the only place an unresolved ``auto`` gets a meaning."""
        return replace(
            self,
            normalization=MAPS_INCUMBENT[0] if self.normalization == "auto" else self.normalization,
            smoothing=MAPS_INCUMBENT[1] if self.smoothing == "auto" else self.smoothing,
            score=SCORE_INCUMBENT if self.score == "auto" else self.score,
        )

    def with_changes(self, **changes: Any) -> MapSettings:
        """A copy with some fields replaced (``None`` leaves a field as it is); validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def maps(self) -> tuple[str, float | str]:
        """(normalization, smoothing): the map setting, as the map choice names it."""
        return self.normalization, self.smoothing

    def score_name(self, score: str | None = None) -> str:
        """The ``KIND:FRACTION[@SIGMA]`` a score computes under these settings (``official`` resolved:
        the "mul" map under this normalisation at ``top_k``); ``score`` defaults to this one's."""
        name = self.with_changes(score=score).resolved().score
        if name == "official":
            kind = "gmul" if self.normalization == "global" else "mul"
            return f"{kind}:{self.top_k:g}"
        return name


def map_candidates(normalization: str, smoothing: float | str) -> list[tuple[str, float]]:
    """The map settings to judge: every combination the run leaves to ``auto``, fixed ones as given."""
    norms = NORMALIZATIONS if normalization == "auto" else (normalization,)
    sigmas = SMOOTHING_CANDIDATES if smoothing == "auto" else (float(smoothing),)
    return [(n, float(s)) for n in norms for s in sigmas]


def map_setting_name(setting: tuple[str, float]) -> str:
    return f"{setting[0]}, smoothing {float(setting[1]):g}"
