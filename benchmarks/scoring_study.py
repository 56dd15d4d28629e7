"""Which image score? Every candidate, on one trained run, judged without test labels (issue 13).

    PYTHONPATH=src python benchmarks/scoring_study.py --run runs/mtd --out study/mtd [--max-train 64]
        [--test-data OTHER_CATEGORY] [--compare logp:0.01 official ...]

Runs the model once over three sets and keeps the per-scale log-likelihood maps (``logps_*.pt``):

- ``holdout``:   the good training images the run held out (the same seeded split as ``fit``);
- ``synthetic``: defective copies of them (``msflow.data.synthetic``, the seed ``--score auto`` uses);
- ``test``:      the test set, for the REPORT only: its labels never enter the decision.

Then it scores every candidate of ``msflow.train.score_selection.CANDIDATES`` from the kept maps and
writes ``study.json``: per candidate the AUROC of held-out good vs synthetic (the evidence a decision
may use) and the test image AUROC (what the decision turned out to be worth), plus the test pixel
AUROC / AUPRO of the per-image and global maps. The run may be finished (``model.json``) or still
training (``checkpoint/last``); for a checkpoint the global reference is calibrated here on
``--max-train`` training images. ``--test-data`` takes the test set from another category folder (a
larger test set of the same data, say); ``--compare A B`` adds the 95 % interval of test AUROC(A) -
AUROC(B) from a paired bootstrap of the test images (good and defective resampled separately).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msflow.config import load_yaml
from msflow.data.datasets import load_dataset
from msflow.data.images import read_image, read_mask, to_tensor
from msflow.data.synthetic import synthetic_set
from msflow.evaluate.metrics import aupro, pixel_auroc, weighted_auroc
from msflow.model.anomaly_map import to_original_size
from msflow.model.checkpoint import load_model, load_tensors
from msflow.model.msflow import MSFlow
from msflow.train.fit import split_holdout
from msflow.train.score_selection import candidate_scores, rank_candidates
from msflow.train.synthetic_check import SYNTHETIC_PER_IMAGE, logp_maps


def load_run(run: Path, max_train: int, train_samples: list) -> tuple[MSFlow, object, str]:
    cfg = load_yaml(run / "config.yaml")
    if (run / "model.json").is_file():
        model, cfg, _ = load_model(run)
        return model, cfg, "final model"
    tensors, meta = load_tensors(run / "checkpoint" / "last")
    model = MSFlow(cfg.model)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    model.eval()
    fit_samples, _ = split_holdout(train_samples, cfg.data.holdout_fraction, cfg.train.seed)
    images = [read_image(s.image) for s in fit_samples[:max_train]]
    with torch.no_grad():
        feats = [
            model.standardize(
                model.extract(torch.stack([to_tensor(im, model.config.size) for im in images[i : i + 8]]))
            )
            for i in range(0, len(images), 8)
        ]
    model.calibrate_global_normalization(feats)
    return (
        model,
        cfg,
        f"checkpoint after epoch {meta['epoch']}, global reference from {len(images)} train images",
    )


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, labels: np.ndarray, rounds: int = 2000, seed: int = 0
) -> list[float]:
    """Test AUROC(a) - AUROC(b) in points, and its 95 % interval over paired bootstrap draws."""
    rng = np.random.default_rng(seed)
    good, bad = labels == 0, labels == 1
    wg = rng.multinomial(good.sum(), np.full(good.sum(), 1 / good.sum()), size=rounds).astype(float)
    wb = rng.multinomial(bad.sum(), np.full(bad.sum(), 1 / bad.sum()), size=rounds).astype(float)

    def auroc(s: np.ndarray, wg: np.ndarray, wb: np.ndarray) -> np.ndarray:
        return weighted_auroc(s[good], s[bad], wg, wb)

    ones_g, ones_b = np.ones(good.sum()), np.ones(bad.sum())
    point = float(auroc(a, ones_g, ones_b) - auroc(b, ones_g, ones_b))
    low, high = np.percentile(auroc(a, wg, wb) - auroc(b, wg, wb), [2.5, 97.5])
    return [round(point, 2), round(float(low), 2), round(float(high), 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-train", type=int, default=64)
    ap.add_argument("--test-data", default=None, help="take the test set from this category folder")
    ap.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cfg0 = load_yaml(args.run / "config.yaml")
    name, train, test = load_dataset(cfg0.data.dataset)
    if args.test_data:
        _, _, test = load_dataset(args.test_data)
    model, cfg, source = load_run(args.run, args.max_train, train)
    device = torch.device("cpu")
    _, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    good_images = [read_image(s.image) for s in holdout]
    defective = [im for im, _ in synthetic_set(good_images, SYNTHETIC_PER_IMAGE, cfg.train.seed)]
    logps = {}
    for key, images in (("holdout", good_images), ("synthetic", defective)):
        logps[key] = logp_maps(model, images, device)
    logps["test"] = logp_maps(model, [s.image for s in test], device)  # files read a batch at a time
    for key, maps in logps.items():
        torch.save(maps, args.out / f"logps_{key}.pt")

    scores = {key: candidate_scores(maps, model.anomaly) for key, maps in logps.items()}
    synthetic = rank_candidates(scores["holdout"], scores["synthetic"])
    labels = np.array([s.label for s in test])
    test_auroc = rank_candidates(
        {c: v[labels == 0] for c, v in scores["test"].items()},
        {c: v[labels == 1] for c, v in scores["test"].items()},
    )
    differences = {
        f"{a} - {b}": bootstrap_difference(scores["test"][a], scores["test"][b], labels)
        for a, b in args.compare
    }
    maps = {}
    if any(s.mask is not None for s in test):
        sizes = [Image.open(s.image).size for s in test]
        masks = [
            read_mask(s.mask) if s.mask is not None else np.zeros((h, w), bool)
            for s, (w, h) in zip(test, sizes, strict=True)
        ]
        for norm in ("per_image", "global"):
            mapper = model.anomaly.with_settings(model.anomaly.settings.with_changes(normalization=norm))
            pixel = []
            for i in range(0, len(test), 32):
                out = mapper.from_log_likelihoods([m[i : i + 32] for m in logps["test"]])
                for j, (w, h) in enumerate(sizes[i : i + 32]):
                    pixel.append(to_original_size(out.pixel_map[j], h, w))
            maps[norm] = {"pixel_auroc": pixel_auroc(masks, pixel), "aupro": aupro(masks, pixel)}
    result = {
        "dataset": name,
        "run": str(args.run),
        "model": source,
        "config": cfg.to_dict()["model"],
        "holdout_images": len(good_images),
        "synthetic_images": len(defective),
        "test_images": len(test),
        "synthetic_auroc": synthetic,
        "test_image_auroc_report_only": test_auroc,
        "test_auroc_differences_report_only": differences,
        "test_maps_report_only": maps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    print(f"{name} ({source}); candidate: synthetic AUROC | test image AUROC (report only)")
    for c in synthetic:
        print(f"  {c:<12} {synthetic[c]:7.2f} | {test_auroc[c]:7.2f}")
    for key, (point, low, high) in differences.items():
        print(f"  test AUROC {key}: {point:+.2f} (95 % bootstrap interval [{low:+.2f}, {high:+.2f}])")
    print("maps:", maps, f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
