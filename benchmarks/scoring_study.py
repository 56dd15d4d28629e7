"""Which image score? Every candidate, on one trained run, judged without test labels (issue 13).

    PYTHONPATH=src python benchmarks/scoring_study.py --run runs/mtd --out study/mtd [--max-train 64]

Runs the model once over three sets and keeps the per-scale log-likelihood maps (``logps_*.pt``):

- ``holdout``:   the good training images the run held out (the same seeded split as ``fit``);
- ``synthetic``: defective copies of them (``msflow.data.synthetic``, the seed ``--score auto`` uses);
- ``test``:      the test set, for the REPORT only: its labels never enter the decision.

Then it scores every candidate of ``msflow.train.score_selection.CANDIDATES`` from the kept maps and
writes ``study.json``: per candidate the AUROC of held-out good vs synthetic (the evidence a decision
may use) and the test image AUROC (what the decision turned out to be worth), plus the test pixel
AUROC / AUPRO of the per-image and global maps. The run may be finished (``model.json``) or still
training (``checkpoint/last``); for a checkpoint the global reference is calibrated here on
``--max-train`` training images.
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
from msflow.data.images import read_image, to_tensor
from msflow.data.synthetic import synthetic_set
from msflow.evaluate.evaluation import Predictions, evaluate_predictions
from msflow.model.anomaly_map import to_original_size
from msflow.model.checkpoint import load_model, load_tensors
from msflow.model.msflow import MSFlow
from msflow.train.fit import split_holdout
from msflow.train.score_selection import (
    SYNTHETIC_PER_IMAGE,
    candidate_scores,
    logp_maps,
    rank_candidates,
)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-train", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cfg0 = load_yaml(args.run / "config.yaml")
    name, train, test = load_dataset(cfg0.data.dataset)
    model, cfg, source = load_run(args.run, args.max_train, train)
    device = torch.device("cpu")
    _, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    good_images = [read_image(s.image) for s in holdout]
    defective = [im for im, _ in synthetic_set(good_images, SYNTHETIC_PER_IMAGE, cfg.train.seed)]
    logps = {}
    for key, images in (("holdout", good_images), ("synthetic", defective)):
        logps[key] = logp_maps(model, images, device)
    test_logps = []
    for i in range(0, len(test), 32):  # the test set is read in chunks to bound memory
        test_logps.append(logp_maps(model, [read_image(s.image) for s in test[i : i + 32]], device))
    logps["test"] = [torch.cat([c[s] for c in test_logps]) for s in range(len(test_logps[0]))]
    for key, maps in logps.items():
        torch.save(maps, args.out / f"logps_{key}.pt")

    scores = {key: candidate_scores(maps, model) for key, maps in logps.items()}
    synthetic = rank_candidates(scores["holdout"], scores["synthetic"])
    labels = np.array([s.label for s in test])
    test_auroc = rank_candidates(
        {c: v[labels == 0] for c, v in scores["test"].items()},
        {c: v[labels == 1] for c, v in scores["test"].items()},
    )
    maps = {}
    if any(s.mask is not None for s in test):
        sizes = [Image.open(s.image).size for s in test]
        for norm in ("per_image", "global"):
            model.anomaly.normalization = norm
            pixel, image = [], []
            for i in range(0, len(test), 32):
                out = model.anomaly.from_log_likelihoods([m[i : i + 32] for m in logps["test"]])
                for j, (w, h) in enumerate(sizes[i : i + 32]):
                    pixel.append(to_original_size(out.pixel_map[j], h, w))
                    image.append(to_original_size(out.image_map[j], h, w))
            preds = Predictions(np.zeros(len(test)), labels, [s.defect_type for s in test], pixel, image)
            m = evaluate_predictions(preds, test)
            maps[norm] = {k: m[k] for k in ("pixel_auroc", "aupro") if k in m}
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
        "test_maps_report_only": maps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    print(f"{name} ({source}); candidate: synthetic AUROC | test image AUROC (report only)")
    for c in synthetic:
        print(f"  {c:<12} {synthetic[c]:7.2f} | {test_auroc[c]:7.2f}")
    print("maps:", maps, f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
