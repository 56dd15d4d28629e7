"""Which maps? Every normalisation x smoothing setting on trained runs, judged without test labels (issue 13).

    PYTHONPATH=src python benchmarks/map_study.py --out study.json mtd=runs/mtd grain=runs/grain ...

For each finished run it re-makes the run's synthetic check (the same held-out good images, seed and
defects as ``msflow train``) and calls :func:`msflow.train.map_selection.choose_maps` on it, exactly as
training does: the decision, every setting's pixel AUROC on the synthetic defects' masks and the
bootstrap lower bounds. Where the test set has masks it also reports, for the REPORT only, each
setting's test pixel AUROC (at the model's input size: masks resized with nearest neighbours, which is
faster than the original-size evaluation of ``msflow test`` and ranks the settings the same way);
those labels never enter the decision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from msflow.data.datasets import load_dataset
from msflow.data.images import read_image, read_mask
from msflow.evaluate.streaming import Binning, auroc_from_histograms
from msflow.model.checkpoint import load_model
from msflow.train.fit import split_holdout
from msflow.train.map_selection import (
    BINS,
    candidates,
    choose_maps,
    pixel_histograms,
    setting_name,
)
from msflow.train.score_selection import SyntheticCheck, logp_maps, synthetic_check


def test_pixel_aurocs(model, test: list) -> dict[str, float]:
    """Test pixel AUROC of every setting (report only): good test images and defective ones with masks."""
    good = [s for s in test if s.label == 0]
    bad = [s for s in test if s.label == 1 and s.mask is not None]

    cpu = torch.device("cpu")  # files are read a batch at a time
    check = SyntheticCheck(
        logp_maps(model, [s.image for s in good], cpu),
        logp_maps(model, [s.image for s in bad], cpu),
        [read_mask(s.mask) for s in bad],
        per_image=1,
    )
    binning = Binning(0.0, float(len(model.anomaly.ref_add)), BINS)
    out = {}
    for setting in candidates("auto", "auto"):
        pos, neg, good_counts = pixel_histograms(model, check, setting, binning)
        pooled_neg = neg.sum(0) + good_counts.sum(0)
        out[setting_name(setting)] = round(float(auroc_from_histograms(pos.sum(0), pooled_neg)[0]), 2)
    return out


def study(run: str) -> dict:
    """The run's map decision re-made from its held-out images, and the test report where there are masks."""
    start = time.perf_counter()
    model, cfg, _ = load_model(run)
    _, train, test = load_dataset(cfg.data.dataset)
    _, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    check = synthetic_check(
        model,
        [read_image(s.image) for s in holdout],
        torch.device("cpu"),
        cfg.train.batch_size,
        cfg.train.seed,
    )
    _, evidence = choose_maps(model, check, seed=cfg.train.seed)
    if any(s.mask is not None for s in test):
        evidence["test_pixel_auroc_report_only"] = test_pixel_aurocs(model, test)
    evidence["seconds"] = round(time.perf_counter() - start, 1)
    return evidence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    results = {}
    for spec in args.runs:
        name, _, run = spec.partition("=")
        results[name] = study(run)
        print(name, json.dumps(results[name]), flush=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
