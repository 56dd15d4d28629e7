"""Time to a finished model of unchanged accuracy, against the official loop at the paper's 100 epochs.

Speed per epoch is measured by ``msflow bench`` on one machine, side by side (``training`` of its
JSON): ours = :meth:`FeatureCache.build` once + ``train_flows`` epochs, the reference = the official
loop (backbone forward and backward at every step). How many epochs each needs to reach a given
accuracy is measured on real data by pairs of finished run folders of the same data and settings:

- ``ours``:      ``--stop plateau`` (the held-out NLL decides the length; the default is the official
                 length, whose time to accuracy is the bench's end-to-end ratio), and
- ``reference``: the official length (``--stop schedule --epochs 100``), float32.

For each pair this module reads the epochs our run took and both runs' test metrics (last epoch, as
every run reports them), checks "unchanged accuracy" (image AUROC within 0.3 points, pixel AUROC
within 0.5, the issue's tolerances), and combines the bench's per-image costs into the end-to-end
ratio at those epoch counts:

    ratio = 100 * t_ref / (t_extract * (1 + h) + E * (t_epoch + h * t_nll))

per training image: t_ref one reference epoch, t_extract the feature extraction, t_epoch one of our
epochs, E our epochs, h the held-out fraction (its images are extracted too and their NLL is measured
after every epoch, at t_nll per image). Each term is read from the bench's JSON (a JSON without
``holdout_nll_seconds_per_image``, written before the bench timed it, counts it as 0).

``msflow bench --accuracy-runs OURS REFERENCE ...`` prints this beside its other figures, from its own
timings; this command recomputes it from a saved bench JSON:

    python -m benchmarks.time_to_accuracy --bench bench.json --pair runs/mono runs/mono100 [--pair ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msflow.config import load_yaml
from msflow.errors import MSFlowError

TOLERANCE = {"image_auroc": 0.3, "pixel_auroc": 0.5}  # points of AUROC (issue 12)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MSFlowError(f"cannot read '{path}': {err}") from None


def run_summary(run: str | Path) -> dict:
    """Epochs, stop rule, training seconds and test metrics of a finished run folder."""
    run = Path(run)
    model, metrics = _read(run / "model.json"), _read(run / "metrics.json")
    training = model.get("training", {})
    return {
        "run": str(run),
        "dataset": metrics.get("dataset"),
        "epochs": int(training.get("epochs", metrics.get("epochs", 0))),
        "stop": training.get("stop", "schedule"),
        "train_seconds": training.get("train_seconds"),
        "holdout_images": training.get("holdout_images", 0),
        "train_images": training.get("train_images"),  # absent in runs made before it was recorded
        **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
    }


def compare(ours: str | Path, reference: str | Path) -> dict:
    """Accuracy deltas (ours - reference) and whether they are within :data:`TOLERANCE`."""
    a, b = run_summary(ours), run_summary(reference)
    if a["dataset"] != b["dataset"]:
        raise MSFlowError(f"'{ours}' ({a['dataset']}) and '{reference}' ({b['dataset']}) are different data")
    deltas, within = {}, True
    for key, tol in TOLERANCE.items():
        if a[key] is None or b[key] is None:  # e.g. no masks: no pixel AUROC
            continue
        deltas[key] = round(a[key] - b[key], 3)
        within &= deltas[key] >= -tol
    return {"ours": a, "reference": b, "deltas": deltas, "unchanged_accuracy": within}


def ratio(
    training: dict,
    epochs: int,
    reference_epochs: int,
    holdout_fraction: float,
    train_images: int | None = None,
) -> float:
    """End-to-end speed-up at ``epochs`` of ours vs ``reference_epochs`` of the reference (see above).

    ``train_images``: the real run's training images. Our epoch has a fixed part (the roll-back snapshot
    of the flows and optimizer, independent of the data size) that the bench measured over its own few
    images; given the real count, it is spread over those instead of the bench's.
    """
    ours, ref = training["ours"], training["reference"]
    n = ours["extract_images"]  # the bench's images: its epoch times are for n images
    t_extract = ours["extract_seconds"] / n
    t_epoch = ours["epoch_seconds"] / n
    if train_images and "epoch_fixed_seconds" in ours:
        fixed = ours["epoch_fixed_seconds"]
        t_epoch = (ours["epoch_seconds"] - fixed) / n + fixed / train_images
    t_nll = ours.get("holdout_nll_seconds_per_image", 0.0)
    t_ref = ref["epoch_seconds"] / n
    h = holdout_fraction
    return reference_epochs * t_ref / (t_extract * (1 + h) + epochs * (t_epoch + h * t_nll))


def report(bench: dict, pairs: list[tuple[str, str]], reference_epochs: int = 100) -> dict:
    rows = []
    for ours, reference in pairs:
        row = compare(ours, reference)
        fraction = load_yaml(Path(ours) / "config.yaml").data.holdout_fraction
        h = fraction / (1 - fraction)  # held-out images per training image
        n_train = row["ours"]["train_images"]
        if not n_train and row["ours"]["holdout_images"] and h:  # older runs: from the seeded split
            n_train = round(row["ours"]["holdout_images"] / h)
        row["ours"]["train_images_used"] = n_train
        speedup = ratio(bench["training"], row["ours"]["epochs"], reference_epochs, h, n_train)
        row["time_to_accuracy_speedup"] = round(speedup, 2)
        rows.append(row)
    return {"reference_epochs": reference_epochs, "pairs": rows}


def format_lines(res: dict) -> list[str]:
    lines = [f"Time to accuracy (vs the official loop at {res['reference_epochs']} epochs)"]
    for row in res["pairs"]:
        a, d = row["ours"], row["deltas"]
        deltas = ", ".join(f"{k} {v:+.2f}" for k, v in d.items())
        verdict = "unchanged" if row["unchanged_accuracy"] else "CHANGED"
        lines.append(
            f"  {a['dataset']}: {a['epochs']} epochs ({a['stop']}) vs {row['reference']['epochs']}: "
            f"{row['time_to_accuracy_speedup']:.2f}x sooner; accuracy {verdict} ({deltas})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", required=True, help="JSON written by msflow bench")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("OURS", "REFERENCE"), required=True)
    parser.add_argument("--reference-epochs", type=int, default=100)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        res = report(_read(Path(args.bench)), [tuple(p) for p in args.pair], args.reference_epochs)
    except MSFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_lines(res)))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
