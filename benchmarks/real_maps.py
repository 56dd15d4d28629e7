"""Every map setting the label-free choice can pick, judged on a run's REAL test masks (issue 20).

    PYTHONPATH=src python benchmarks/real_maps.py RUN [--data CATEGORY] --out real_maps.json

A report, never a choice: the run's test images (good ones and defective ones with masks) go through
the model once; each (normalisation, smoothing) candidate of ``msflow.scoring.map_candidates`` then
turns the same log-likelihood maps into pixel maps, and their pixel AUROC against the masks (resized
to the maps' size, i.e. at the model's input resolution; ``msflow test`` gives the original-size
figure of one setting) is computed from histograms, as the synthetic check does. The paired
bootstrap (defective and good test images resampled, each group on its own) gives a 95 % interval of
each setting's difference to the paper's maps, so "global+blur2 loses X points on real masks" comes
with its sampling error. Put next to the synthetic check's ranking of the same settings
(``msflow test --choose``: map_selection.json), this says whether the proxy agrees with real defects.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from msflow.data.datasets import load_dataset
from msflow.data.images import read_mask
from msflow.evaluate.metrics import bootstrap_counts
from msflow.evaluate.streaming import Binning, auroc_from_histograms
from msflow.infer.predictor import Predictor
from msflow.scoring import MAPS_INCUMBENT, map_candidates, map_setting_name
from msflow.train.map_selection import BINS, pixel_histograms
from msflow.train.synthetic_check import SyntheticCheck, predictor_maps

ROUNDS = 2000


def difference_interval(
    histograms: dict, incumbent: tuple, rounds: int = ROUNDS, seed: int = 0
) -> dict[tuple, tuple[float, float]]:
    """95 % percentile interval of (setting - incumbent) pixel AUROC under a bootstrap that redraws the
    defective images and the good images (each group on its own, the same draws for every setting)."""
    pos0, neg0, good0 = histograms[incumbent]
    rng = np.random.default_rng(seed)
    w_bad = bootstrap_counts(pos0.shape[0], rounds, rng)
    w_good = bootstrap_counts(good0.shape[0], rounds, rng) if good0.shape[0] else np.zeros((rounds, 0))

    def draws(h: tuple) -> np.ndarray:
        pos, neg, good = (a.astype(np.float64) for a in h)
        pooled = w_bad @ neg + (w_good @ good if good.shape[0] else 0.0)
        return auroc_from_histograms(w_bad @ pos, pooled)[0]

    base = draws(histograms[incumbent])
    out = {}
    for setting, h in histograms.items():
        d = draws(h) - base
        out[setting] = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)))
    return out


def real_mask_report(
    run: str, data: str | None = None, batch_size: int = 8, limit: tuple[int, int] | None = None
) -> dict:
    """Pixel AUROC of every map setting on the run's real test masks (model resolution), with intervals.
    ``limit`` = (good, defective): at most that many test images of each kind, a seeded draw (cost)."""
    start = time.perf_counter()
    predictor = Predictor.load(run, device="cpu")
    _, _, test = load_dataset(data or predictor.config.data.dataset)
    good = [s.image for s in test if s.label == 0]
    bad = [s for s in test if s.label == 1 and s.mask is not None]
    if limit is not None:
        rng = random.Random(0)
        good = sorted(rng.sample(good, min(limit[0], len(good))))
        bad = sorted(rng.sample(bad, min(limit[1], len(bad))), key=lambda s: str(s.image))
    if not bad:
        raise SystemExit(f"{run}: the test set has no defective image with a mask")
    check = SyntheticCheck(
        predictor_maps(predictor, good, batch_size) if good else [],
        predictor_maps(predictor, [s.image for s in bad], batch_size),
        [read_mask(s.mask) for s in bad],
        per_image=1,
    )
    mapper = predictor.model.anomaly
    binning = Binning(0.0, float(len(mapper.ref_add)), BINS)
    settings = map_candidates("auto", "auto")
    histograms = {s: _histograms(mapper, check, s, binning) for s in settings}
    aurocs = {
        s: float(auroc_from_histograms(h[0].sum(0), h[1].sum(0) + h[2].sum(0))[0])
        for s, h in histograms.items()
    }
    intervals = difference_interval(histograms, MAPS_INCUMBENT)
    return {
        "run": str(run),
        "resolution": "model",
        "incumbent": map_setting_name(MAPS_INCUMBENT),
        "pixel_auroc": {map_setting_name(s): round(a, 2) for s, a in aurocs.items()},
        "difference_to_incumbent_95": {
            map_setting_name(s): [round(v, 2) for v in iv] for s, iv in intervals.items()
        },
        "good_images": len(good),
        "defective_images": len(bad),
        "limit": limit,
        "bootstrap_rounds": ROUNDS,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _histograms(mapper, check: SyntheticCheck, setting: tuple, binning: Binning) -> tuple:
    if check.good:
        return pixel_histograms(mapper, check, setting, binning)
    # no good test image: the defective images' own normal pixels are the only negatives
    only_bad = SyntheticCheck(check.defective, check.defective, check.masks, per_image=1)
    pos, neg, _ = pixel_histograms(mapper, only_bad, setting, binning)
    return pos, neg, np.zeros((0, pos.shape[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", default=None, help="category folder (default: the run's own dataset)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, nargs=2, metavar=("GOOD", "DEFECTIVE"), default=None)
    args = parser.parse_args(argv)
    report = real_mask_report(args.run, args.data, limit=args.limit)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
