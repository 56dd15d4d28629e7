"""Datasets: MVTec-style folders (MVTec AD, VisA 1cls, custom data), the built-in ELPV set, a torch Dataset.

Folder layout (one *category*)::

    <category>/train/good/*.png                     defect-free training images
    <category>/test/good/*.png                      defect-free test images (label 0; test/ is optional)
    <category>/test/<defect type>/*.png             defective test images (label 1)
    <category>/ground_truth/<defect type>/<stem>_mask.png   (MVTec) or <stem>.png (VisA)

Without a ``ground_truth`` folder only image-level metrics are possible (all masks None).
With one, every defective image must have exactly one mask and every mask an image, so
that pixel metrics never silently treat an unannotated defect as defect-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from msflow.data.images import image_size, list_images, read_image, read_mask, to_tensor
from msflow.errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

ELPV_TRAIN_PERCENT = 70  # of the defect-free cells; integer maths, no float rounding


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: Image file.
        label: 0 for good, 1 for defective.
        defect_type: "good" for good images, else the defect folder name ("defect" for ELPV).
        mask: Ground-truth mask file, or None (good images, or no annotations).
    """

    image: Path
    label: int
    defect_type: str
    mask: Path | None = None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _match_masks(images: list[Path], gt_dir: Path) -> list[Path]:
    """Return the mask of each image in ``images`` (same order), matched by file stem."""
    by_stem: dict[str, Path] = {}
    for mask in list_images(gt_dir):
        key = mask.stem.removesuffix("_mask")
        if key in by_stem:
            raise DataError(f"two masks for the same image: '{by_stem[key]}' and '{mask}'")
        by_stem[key] = mask

    masks: list[Path] = []
    for image in images:
        mask = by_stem.pop(image.stem, None)
        if mask is None:
            raise DataError(
                f"image '{image}' has no mask in '{gt_dir}' "
                f"(expected {image.stem}_mask.png or {image.stem}.png)"
            )
        masks.append(mask)
    if by_stem:
        extra = sorted(by_stem.values())
        raise DataError(
            f"mask '{extra[0]}' has no matching image in '{images[0].parent}' ({len(extra)} unmatched)"
        )
    return masks


def parse_folder(category_dir: str | os.PathLike[str]) -> tuple[list[Sample], list[Sample]]:
    """Parse one MVTec-style category folder (MVTec AD, VisA 1cls or custom data).

    Files are sorted, so the result is deterministic. Only image extensions are listed
    (``.txt``, ``.DS_Store``... are ignored); whether the files decode is checked later by
    :func:`validate_samples`. Empty ``test/<type>`` folders are skipped.

    Args:
        category_dir: Folder holding ``train/``, ``test/`` and optionally ``ground_truth/``.

    Returns:
        (train, test) sample lists. Train samples are all good; test samples are sorted by
        defect type ("good" first), then by file name. Without a ``test/`` folder the test list is
        empty (a folder of good images only still trains a model).

    Raises:
        DataError: Missing or empty folders, masks without images, images without masks.
    """
    root = Path(category_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist or is not a folder")
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DataError(f"'{train_dir}' is missing: a category needs train/good/ with defect-free images")
    train = [Sample(p, 0, "good", None) for p in list_images(train_dir)]
    if not train:
        raise DataError(f"no images (.png, .jpg, .bmp, .tif...) in '{train_dir}'")

    test_root = root / "test"
    if not test_root.is_dir():  # good images only (a new inspection project): a model, no test metrics
        return train, []
    # "good" first so that the order reads naturally; the rest alphabetically.
    folders = sorted(_subfolders(test_root), key=lambda p: (p.name != "good", p.name))
    by_type = {f.name: imgs for f in folders if (imgs := list_images(f))}
    if not by_type:
        raise DataError(f"no test images in '{test_root}' (expected test/good/ and test/<defect type>/)")

    gt_root = root / "ground_truth"
    has_gt = gt_root.is_dir()
    if has_gt:
        for gt_dir in _subfolders(gt_root):
            kind, masks = gt_dir.name, list_images(gt_dir)
            if kind != "good" and kind not in by_type and masks:
                raise DataError(f"mask '{masks[0]}' has no matching image: no images in '{test_root / kind}'")

    test: list[Sample] = []
    for kind, images in by_type.items():
        if kind == "good" or not has_gt:
            test += [Sample(p, int(kind != "good"), kind, None) for p in images]
            continue
        gt_dir = gt_root / kind
        if not gt_dir.is_dir() or not list_images(gt_dir):
            raise DataError(
                f"no masks in '{gt_dir}': '{gt_root}' exists, so every defect type needs masks "
                "(remove ground_truth for image-level evaluation only)"
            )
        test += [Sample(p, 1, kind, m) for p, m in zip(images, _match_masks(images, gt_dir), strict=False)]
    return train, test


def find_categories(root: str | os.PathLike[str]) -> list[Path]:
    """Return ``[root]`` if root is a category (has ``train/``), else its category sub-folders, sorted.

    Raises:
        DataError: If ``root`` is missing or holds no category.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"dataset folder '{base}' does not exist or is not a folder")
    if (base / "train").is_dir():
        return [base]
    found = [p for p in _subfolders(base) if (p / "train").is_dir()]
    if not found:
        raise DataError(f"'{base}' is not a category folder (no train/) and has no category sub-folders")
    return found


def validate_samples(samples: list[Sample], what: str = "training set", max_listed: int = 5) -> None:
    """Decode every image and mask fully and check mask sizes; report all problems at once.

    Meant to run before training, so a bad file stops the run before any work is done.

    Args:
        samples: Samples to check.
        what: Name of the set, used in the message.
        max_listed: How many bad files the message lists.

    Raises:
        DataError: First line ``<what>: N of M files cannot be used``, then one line per
            listed file with its reason.
    """
    if not samples:
        raise DataError(f"{what} is empty")
    problems: list[str] = []
    for sample in samples:
        try:
            size = image_size(read_image(sample.image))
            if sample.mask is not None:
                read_mask(sample.mask, size=size)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:max_listed])
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise DataError(f"{what}: {len(problems)} of {len(samples)} samples cannot be used\n{listed}{more}")


# ----------------------------------------------------------------------------- ELPV


def _cache_root() -> Path:
    return Path(os.environ.get("MSFLOW_CACHE") or Path.home() / ".cache" / "msflow")


def _materialise(data: bytes, dest: Path) -> Path:
    """Write ``data`` to ``dest`` atomically (tmp + rename) unless it already exists."""
    if dest.is_file() and dest.stat().st_size == len(data):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)  # atomic: readers never see a half-written file
    return dest


def _elpv_rows() -> tuple[list[tuple[str, float, str]], Any]:
    """Read the ELPV label table: rows (relative path, defect probability, "mono"/"poly"), data root."""
    try:
        from importlib.resources import files

        data = files("elpv_dataset") / "data"
        text = (data / "labels.csv").read_text()
    except (ImportError, OSError) as exc:
        raise DataError(f"built-in dataset 'elpv' needs the package elpv-dataset: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rel, prob, kind = line.split()
                rows.append((rel, float(prob), kind))
            except ValueError:
                raise DataError(f"elpv-dataset labels.csv line {n} cannot be parsed: {line!r}") from None
    return sorted(rows), data


def elpv_samples(category: Literal["mono", "poly"], seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split the ELPV solar-cell set (elpv-dataset package, 2,624 300x300 EL images) for one cell type.

    Each cell has an expert defect probability of 0, 1/3, 2/3 or 1. The split:

    * train: 70 % (rounded down) of the defect-free cells (probability 0), chosen by
      ``np.random.default_rng(seed).permutation`` over the cells sorted by file name;
    * test: the other 30 % of the defect-free cells (label 0, type "good") plus every cell
      with probability 1 (label 1, type "defect");
    * cells with probability 1/3 or 2/3 are left out: the experts themselves were unsure,
      so either label would be noise in the metrics.

    Labels are image-level only (mask None). The package's PNG files are used in place
    when it is installed as plain files; otherwise (e.g. zipped) they are copied once to
    ``$MSFLOW_CACHE/elpv/<category>/`` (default ``~/.cache/msflow``).

    Args:
        category: "mono" (monocrystalline) or "poly" (polycrystalline) cells.
        seed: Seed of the train/test permutation.

    Returns:
        (train, test), each sorted by file name within good/defect.
    """
    if category not in ("mono", "poly"):
        raise DataError(f"elpv category must be 'mono' or 'poly', not {category!r}")
    rows, data = _elpv_rows()
    good = [rel for rel, p, kind in rows if kind == category and p == 0.0]
    bad = [rel for rel, p, kind in rows if kind == category and p == 1.0]

    order = np.random.default_rng(seed).permutation(len(good))
    n_train = len(good) * ELPV_TRAIN_PERCENT // 100
    train_rel = sorted(good[i] for i in order[:n_train])
    test_good_rel = sorted(good[i] for i in order[n_train:])

    def path_of(rel: str) -> Path:
        resource = data / rel
        if isinstance(resource, Path) and resource.is_file():
            return resource
        try:
            return _materialise(resource.read_bytes(), _cache_root() / "elpv" / category / Path(rel).name)
        except OSError as exc:
            raise DataError(f"elpv image '{rel}' cannot be read or cached: {exc}") from None

    train = [Sample(path_of(r), 0, "good", None) for r in train_rel]
    test = [Sample(path_of(r), 0, "good", None) for r in test_good_rel]
    test += [Sample(path_of(r), 1, "defect", None) for r in bad]
    return train, test


def load_dataset(spec: str) -> tuple[str, list[Sample], list[Sample]]:
    """Load a dataset from ``elpv:mono``, ``elpv:poly`` or the path of one category folder.

    Returns:
        (name, train, test); the name is ``elpv-mono``/``elpv-poly`` or the folder name.

    Raises:
        DataError: Unknown spec, or a folder that is not exactly one category.
    """
    text = str(spec)
    if text.lower().startswith("elpv:") or text.lower() == "elpv":
        category = text.partition(":")[2].strip().lower()
        if category not in ("mono", "poly"):
            raise DataError(f"unknown built-in dataset {text!r}: use 'elpv:mono' or 'elpv:poly'")
        train, test = elpv_samples(category)  # type: ignore[arg-type]
        return f"elpv-{category}", train, test
    folder = Path(text)
    categories = find_categories(folder)
    if categories != [folder]:
        names = ", ".join(p.name for p in categories[:5]) + (", ..." if len(categories) > 5 else "")
        raise DataError(f"'{folder}' holds several categories ({names}); pass one of them")
    train, test = parse_folder(folder)
    return folder.resolve().name, train, test


class ImageDataset(Dataset):
    """Samples as model inputs (the official transform, see :func:`msflow.data.images.to_tensor`).

    ``image_size`` is a side S or (H, W). Each item is a dict with ``image`` (3, H, W) float32,
    ``label`` and ``index`` ints, and
    ``original_size`` (2,) int64 tensor holding (width, height) of the file. Masks are not read here:
    metrics compare the maps with the masks at their original resolution.
    """

    def __init__(self, samples: list[Sample], image_size: int | tuple[int, int]) -> None:
        self.samples = list(samples)
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        image = read_image(sample.image)
        return {
            "image": to_tensor(image, self.image_size),
            "label": sample.label,
            "index": index,
            "original_size": torch.tensor(image_size(image), dtype=torch.int64),
        }
