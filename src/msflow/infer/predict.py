"""``msflow predict``: judge image files and folders with a trained run, write maps, masks and a summary.

Per image (all at the image's original resolution): ``<name>_overlay.png`` (jet heatmap of the "mul"
map with the predicted contour), ``<name>_map.png`` (the "add" map as 16-bit grey, scaled to [0, 1]
by its maximum possible value 3) and ``<name>_mask.png`` (0/255). For the whole call: ``predictions.csv``
and ``summary.json``. A file that cannot be read is listed as failed; the others carry on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from msflow.data.images import IMAGE_EXTENSIONS, list_images, read_image, to_uint8
from msflow.detector import Detector
from msflow.errors import DataError, MSFlowError
from msflow.evaluate import report
from msflow.files import atomic_write_bytes


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
    detector: Detector,
    inputs: list[str],
    output: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    save_images: bool = True,
) -> dict:
    """Predict every input; returns the summary (also written to ``output/summary.json``)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    if not files:
        raise MSFlowError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(inputs)}")
    rows, failures, used = [], [], set()
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        images = []
        for f in chunk:  # read first, so one bad file does not sink its batch
            try:
                images.append((f, read_image(f)))
            except DataError as err:
                failures.append({"image": str(f), "error": str(err)})
        if images:
            results = detector.predict_batch([arr for _, arr in images])
            for (f, arr), res in zip(images, results, strict=True):
                name = _out_name(f, used)
                row = {"image": str(f), **res.summary()}
                if save_images:
                    report.save_overlay(
                        output / f"{name}_overlay.png",
                        to_uint8(arr),
                        res.image_map,
                        pred_mask=res.mask if res.is_defective else None,
                    )
                    grey = (np.clip(res.anomaly_map / 3.0, 0, 1) * 65535).astype(np.uint16)
                    Image.fromarray(grey).save(output / f"{name}_map.png")
                    Image.fromarray((res.mask * 255).astype(np.uint8)).save(output / f"{name}_mask.png")
                    row["overlay"] = f"{name}_overlay.png"
                rows.append(row)
        bar.update(len(chunk))
    bar.close()
    if rows:
        report.write_predictions_csv(output / "predictions.csv", rows)
    seconds = time.perf_counter() - start
    summary = {
        "model": str(detector.meta.get("dataset", "")),
        "runtime": detector.runtime,
        "threshold": detector.threshold.to_dict(),
        "images": len(files),
        "predicted": len(rows),
        "defective": sum(r["decision"] == "defective" for r in rows),
        "failed": len(failures),
        "failures": failures,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "predictions": rows,
    }
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
