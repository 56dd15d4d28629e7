"""What ``--score auto`` decides on finished runs: the synthetic check re-run with today's rule.

    PYTHONPATH=src python benchmarks/auto_score_check.py RUN[=DATA] ... [--output check.json]

For each run folder it rebuilds the model, takes the good images the run held out (the same split:
``data.holdout_fraction`` and ``train.seed`` of its config; ``=DATA`` when the data has moved), and
calls :func:`msflow.train.score_selection.choose_score`, exactly what ``msflow train`` runs after
training. It prints the pick, the candidate with the highest label-free AUROC and its bootstrap lower
bound against the incumbent. No test image is read. Re-scoring the test set with the pick
(``msflow test --model RUN --score PICK``) is a separate, report-only step.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from msflow.data.datasets import load_dataset
from msflow.data.images import read_image
from msflow.errors import MSFlowError
from msflow.model.checkpoint import load_model
from msflow.train.fit import split_holdout
from msflow.train.score_selection import INCUMBENT, choose_score, synthetic_check


def check(run: str, data: str | None = None) -> dict:
    model, cfg, _ = load_model(run)
    _, train, _ = load_dataset(data or cfg.data.dataset)
    _, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    if len(holdout) < 2:
        raise MSFlowError(f"'{run}' held out {len(holdout)} good images: nothing to judge the scores on")
    images = [read_image(s.image) for s in holdout]
    synthetic = synthetic_check(model, images, torch.device("cpu"), cfg.train.batch_size, seed=cfg.train.seed)
    _, evidence = choose_score(model, synthetic)
    return evidence


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN[=DATA]")
    ap.add_argument("--output", default=None, help="JSON file with every run's evidence")
    args = ap.parse_args(argv)
    out = {}
    for spec in args.runs:
        run, _, data = spec.partition("=")
        try:
            ev = check(run, data or None)
        except MSFlowError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        top, bound = ev["highest_auroc"], ev["difference_lower_bound"]
        print(
            f"{run}: {ev['good_images']} held-out images; auto picks {ev['chosen']}; highest AUROC "
            f"{top} {ev['auroc'][top]} vs {INCUMBENT} {ev['auroc'][INCUMBENT]} (lower bound of the "
            f"difference {bound[top]:+.2f})",
            flush=True,
        )
        out[run] = ev
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
