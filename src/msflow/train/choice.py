"""The label-free choices of a run, in one step: maps first, then the image score under those maps.

``msflow train`` calls :func:`choose_settings` once the flows are trained (``auto`` settings are
decided, fixed ones only measured); ``msflow test --model RUN --choose`` re-makes them on a finished
run without retraining (:func:`remake_choices`). Both write ``map_selection.json`` and
``score_selection.json`` (every candidate's AUROC on the synthetic check, its gain over the incumbent
and the bootstrap's lower bound of that gain). The rule is ``msflow.train.synthetic_check``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from msflow.config import ModelConfig
from msflow.data.datasets import Sample
from msflow.data.images import read_image
from msflow.errors import MSFlowError
from msflow.files import atomic_write_bytes
from msflow.infer.predictor import Predictor
from msflow.scoring import MapSettings, map_setting_name
from msflow.train.map_selection import choose_maps
from msflow.train.score_selection import choose_score
from msflow.train.synthetic_check import SyntheticCheck, synthetic_check


def choose_on_check(
    predictor: Predictor, check: SyntheticCheck, asked: MapSettings, source: str = "holdout"
) -> tuple[MapSettings, dict, dict]:
    """(the settings to use, the maps' evidence, the score's evidence) on a synthetic check.

    ``asked`` holds what the run asks for: an ``auto`` is decided, a fixed value is kept and measured.
    """
    (normalization, smoothing), map_evidence = choose_maps(
        predictor.model, check, asked.normalization, asked.smoothing, seed=check.seed
    )
    maps = asked.with_changes(normalization=normalization, smoothing=smoothing)
    under_maps = predictor.with_settings(maps)  # the scores are judged under the chosen maps
    fixed = None if asked.score == "auto" else asked.score  # measured, never replaced
    chosen, score_evidence = choose_score(under_maps.model, check, source, also=fixed)
    score_evidence["used"] = fixed or chosen
    return maps.with_changes(score=fixed or chosen), map_evidence, score_evidence


def choose_settings(
    predictor: Predictor,
    fit_samples: list[Sample],
    holdout: list[Sample],
    run_dir: Path,
    batch_size: int,
    asked: MapSettings | None = None,
    log: Callable[[str], None] = print,
) -> tuple[MapSettings, float]:
    """Build the synthetic check on a run's held-out good images (its training images, biased, without
    a hold-out), choose, record the evidence in ``run_dir``; returns the settings and the image AUROC of
    the score used on the check. ``asked`` defaults to the predictor's settings (with their ``auto``)."""
    good = holdout or fit_samples
    which = "held-out" if holdout else "training"
    log(f"synthetic check: synthetic defects drawn into {len(good)} {which} good images")
    source = "holdout" if holdout else "train (no hold-out: biased)"
    asked = predictor.config.model.maps if asked is None else asked
    seed = predictor.config.train.seed  # training's: the same synthetic defects when re-made
    check = synthetic_check(predictor, [read_image(s.image) for s in good], batch_size, seed=seed)
    settings, map_evidence, evidence = choose_on_check(predictor, check, asked, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "map_selection.json", json.dumps(map_evidence, indent=2).encode())
    atomic_write_bytes(run_dir / "score_selection.json", json.dumps(evidence, indent=2).encode())
    maps = (settings.normalization, float(settings.smoothing))
    log(
        f"maps: {maps[0]} normalisation, smoothing {maps[1]:g}: pixel AUROC "
        f"{map_evidence['pixel_auroc'][map_setting_name(maps)]} on synthetic defects "
        f"(incumbent {map_evidence['incumbent']})"
    )
    # "official" is recorded by its concrete name when chosen (mul or gmul at top_k)
    auroc = evidence["auroc"].get(settings.score, evidence["auroc"]["official"])
    top = evidence["highest_auroc"]
    log(
        f"image score {settings.score}: AUROC {auroc} on held-out good images vs synthetic defects "
        f"(auto's pick {evidence['chosen']}; highest {top} {evidence['auroc'][top]})"
    )
    return settings, auroc


def remake_choices(
    predictor: Predictor,
    out_dir: Path,
    data: str | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
    asked: MapSettings | None = None,
) -> MapSettings:
    """Re-make a finished run's label-free choices with today's candidates and rule (no retraining):
    the settings ``asked`` (by default today's defaults: the score and the normalisation ``auto``, the
    paper's smoothing) are judged on the run's own held-out good images (the same seeded split and
    synthetic defects as training; ``data`` when the dataset has moved). The evidence goes to
    ``out_dir``; returns the settings chosen. No test image is read."""
    from msflow.train.fit import run_holdout  # fit calls this module: imported when needed

    cfg = predictor.config
    fit_samples, holdout = run_holdout(cfg, data)
    good = len(holdout or fit_samples)
    if good < 2:
        raise MSFlowError(f"the run's dataset has {good} good images to judge on; at least 2 are needed")
    if asked is None:
        default = ModelConfig()
        asked = MapSettings(default.normalization, default.smoothing, "auto", cfg.model.top_k)
    return choose_settings(predictor, fit_samples, holdout, out_dir, batch_size, asked, log)[0]
