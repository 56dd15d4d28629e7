"""``msflow predict``: judge image files and folders with a trained run, write maps, masks and a summary.

Per image (all at the image's original resolution): ``<name>_overlay.png`` (jet heatmap of the "mul"
map with the predicted contour), ``<name>_map.png`` (the "add" map as 16-bit grey, scaled to [0, 1]
by its maximum possible value 3) and ``<name>_mask.png`` (0/255). For the whole call: ``predictions.csv``
(written as it goes; ``--resume`` continues it) and ``summary.json`` (counts, failures). A file that
cannot be read is listed as failed; the others carry on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from msflow.data.images import IMAGE_EXTENSIONS, list_images, read_image, to_uint8
from msflow.errors import DataError, MSFlowError
from msflow.evaluate import report
from msflow.files import atomic_write_bytes
from msflow.infer.predictor import Prediction, Predictor

CSV_FIELDS = ["image", "score", "normalized_score", "decision", "threshold", "defect_pixels", "overlay"]


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted, de-duplicated list of image files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path, recursive=True))
        elif path.is_file():
            files.append(path)
        else:
            raise MSFlowError(f"input '{path}' does not exist")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _out_name(path: Path, used: set[str]) -> str:
    name = path.stem
    while name in used:  # same stem in two folders: keep both
        name = f"{name}_{len(used)}"
    used.add(name)
    return name


def run_predict(
    predictor: Predictor,
    inputs: list[str],
    output: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    save_images: bool = True,
    resume: bool = False,
) -> dict:
    """Predict every input; returns the summary (also written to ``output/summary.json``).

    Rows go to ``predictions.csv`` as each batch finishes (flushed), so a crash keeps every finished
    row; nothing per image is kept in memory but its path. ``resume=True`` keeps the rows already in
    ``predictions.csv`` and skips their images (a fresh run starts the file anew).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    if not files:
        raise MSFlowError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(inputs)}")
    writer = report.RowWriter(output / "predictions.csv", CSV_FIELDS, append=resume)
    done: set[str] = set()
    used: set[str] = set()
    predicted = defective = 0
    for row in report.read_rows(output / "predictions.csv") if resume else ():
        done.add(row["image"])
        if row.get("overlay"):  # its output names stay taken
            used.add(row["overlay"].removesuffix("_overlay.png"))
        predicted += 1
        defective += row["decision"] == "defective"
    skipped = len(done)
    todo = [f for f in files if str(f) not in done]
    failures: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress)
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            images = []
            for f in chunk:  # read first, so one bad file does not sink its batch
                try:
                    images.append((f, read_image(f)))
                except DataError as err:
                    failures.append({"image": str(f), "error": str(err)})
            if images:
                results = predictor.predict_images([im for _, im in images])
                for (f, im), res in zip(images, results, strict=True):
                    row = {"image": str(f), **res.summary()}
                    if save_images:
                        row["overlay"] = _save_maps(output, _out_name(f, used), to_uint8(im), res)
                    writer.write(row)
                    predicted += 1
                    defective += res.is_defective
            bar.update(len(chunk))
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - start
    new = predicted - skipped
    summary = {
        "model": str(predictor.meta.get("dataset", "")),
        "runtime": predictor.runtime,
        "threshold": predictor.threshold.to_dict(),
        "images": len(files),
        "predicted": predicted,
        "defective": defective,
        "skipped": skipped,
        "failed": len(failures),
        "failures": failures,
        "seconds": round(seconds, 3),
        "images_per_second": round(new / seconds, 2) if seconds > 0 and new else None,
        "predictions": "predictions.csv",
    }
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _save_maps(output: Path, name: str, image: np.ndarray, res: Prediction) -> str:
    """Overlay, 16-bit "add" map and mask of one image; returns the overlay's file name."""
    report.save_overlay(
        output / f"{name}_overlay.png", image, res.image_map, pred_mask=res.mask if res.is_defective else None
    )
    grey = (np.clip(res.anomaly_map / 3.0, 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(grey).save(output / f"{name}_map.png")
    Image.fromarray((res.mask * 255).astype(np.uint8)).save(output / f"{name}_mask.png")
    return f"{name}_overlay.png"
