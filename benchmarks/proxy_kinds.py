"""The synthetic check's map ranking, kind by kind: which synthetic defects make blur look good or bad.

    PYTHONPATH=src python benchmarks/proxy_kinds.py RUN [--data CATEGORY] --out proxy_kinds.json

A report, never a choice. The run's own held-out good images and their synthetic copies (the seeded
split and defects of ``msflow test --choose``) go through the model once; every map setting's pixel
AUROC is then computed on all copies (what the choice reads: ``map_selection.json``) and on the copies
of one kind at a time (``msflow.data.synthetic.KINDS``; copy k is of kind ``KINDS[k % len(KINDS)]``),
each against all the good images' pixels. ``per_defect`` weighs every copy's defect pixels so that each
defect counts once, however large: the pooled AUROC is ruled by the few largest defects. ``scores``:
every candidate image score's AUROC on the same check under the paper's maps, as ``choose_score``
measures it (to set beside ``msflow test --all-scores``' test AUROCs under the same maps).
``rule_with_smoothing_auto``: what the rule decides when blur is among the candidates, with the bounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from msflow.data.datasets import load_dataset
from msflow.data.images import read_image
from msflow.data.synthetic import KINDS
from msflow.evaluate.streaming import Binning, auroc_from_histograms
from msflow.infer.predictor import Predictor
from msflow.scoring import MAPS_INCUMBENT, MapSettings, map_candidates, map_setting_name
from msflow.train.choice import choose_on_check
from msflow.train.map_selection import BINS, choose_maps, pixel_histograms
from msflow.train.synthetic_check import synthetic_check


def gains(histograms: dict, rows: np.ndarray, per_defect: bool = False) -> dict[str, float]:
    """Each setting's pixel AUROC minus the paper's maps' on the copies ``rows`` (all good images)."""
    out = {}
    for setting, (pos, neg, good) in histograms.items():
        p = pos[rows].astype(np.float64)
        if per_defect:  # each defect weighs as much as the mean defect
            sums = p.sum(axis=1, keepdims=True)
            p = p / np.maximum(sums, 1) * sums.mean()
        out[setting] = float(auroc_from_histograms(p.sum(0), neg[rows].sum(0) + good.sum(0))[0])
    base = out[MAPS_INCUMBENT]
    return {map_setting_name(s): round(v - base, 3) for s, v in out.items()} | {
        "paper's AUROC": round(base, 3)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default=None, help="the run's dataset, when it has moved")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from msflow.train.fit import split_holdout

    t0 = time.time()
    predictor = Predictor.load(args.run, device="cpu")
    cfg = predictor.config
    _, train, _ = load_dataset(args.data or cfg.data.dataset)
    fit_samples, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    images = [read_image(s.image) for s in holdout or fit_samples]
    check = synthetic_check(predictor, images, seed=cfg.train.seed)
    mapper = predictor.model.anomaly
    binning = Binning(0.0, float(len(mapper.ref_add)), BINS)
    histograms = {s: pixel_histograms(mapper, check, s, binning) for s in map_candidates("auto", "auto")}
    _, rule = choose_maps(predictor.model, check, "auto", "auto", seed=check.seed)  # --smoothing auto
    paper = MapSettings(*MAPS_INCUMBENT, "auto", cfg.model.top_k)
    _, _, score_evidence = choose_on_check(predictor, check, paper)
    kinds = np.array([KINDS[k % len(KINDS)] for k in range(len(check.masks))])
    every = np.arange(len(kinds))
    report = {
        "run": args.run,
        "good_images": check.sources,
        "synthetic_images": len(kinds),
        "defect_pixels_share_by_kind": {
            k: round(
                float(sum(check.masks[i].sum() for i in every[kinds == k]))
                / float(sum(m.sum() for m in check.masks)),
                3,
            )
            for k in KINDS
        },
        "rule_with_smoothing_auto": {
            k: rule[k] for k in ("chosen", "gain_over_incumbent", "difference_lower_bound")
        },
        "all": gains(histograms, every),
        "all_per_defect": gains(histograms, every, per_defect=True),
        "by_kind": {k: gains(histograms, every[kinds == k]) for k in KINDS},
        "scores": {
            k: score_evidence[k] for k in ("chosen", "auroc", "gain_over_incumbent", "difference_lower_bound")
        },
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
