"""Datasets: the layouts people keep images in, the built-in ELPV set, a torch Dataset.

MVTec layout (one *category*; MVTec AD, VisA 1cls, custom data)::

    <category>/train/good/*.png                     defect-free training images
    <category>/test/good/*.png                      defect-free test images (label 0; test/ is optional)
    <category>/test/<defect type>/*.png             defective test images (label 1)
    <category>/ground_truth/<defect type>/<stem>_mask.png   (MVTec) or <stem>.png (VisA)

Without a ``ground_truth`` folder only image-level metrics are possible (all masks None). With one,
every defective image must have exactly one mask and every mask an image, so that pixel metrics never
silently treat an unannotated defect as defect-free. A plain folder (images in it or in sub-folders, no
``train/``) is good images only: a model, no test metrics. anomalib's ``Folder`` layout (``normal_dir``,
``abnormal_dir``, ``mask_dir``) adds defective images and held-out good ones (:func:`folder_samples`).
Whatever the layout, training holds out a share of its good images for the threshold (``msflow.train.fit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from msflow.config import DataConfig
from msflow.data.images import image_size, list_images, read_image, read_mask, to_tensor
from msflow.errors import DataError
from msflow.files import atomic_write_bytes

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

ELPV_TRAIN_PERCENT = 70  # of the defect-free cells; integer maths, no float rounding
# Mask file names: the image's stem, or the stem with one of these suffixes (MVTec writes "_mask").
MASK_SUFFIXES = ("_mask", "-mask", "_gt", "-gt", "_label")
# The good images an --abnormal-dir test set takes are drawn with this seed: fixed, so that
# ``msflow test`` on a run sees the same test set as its training did.
FOLDER_SPLIT_SEED = 0


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    image: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good", else the defect folder's name ("defect" for ELPV)
    mask: Path | None = None  # None for good images, or without annotations


def _folder(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist or is not a folder")
    return root


def _images(folder: Path, recursive: bool = True) -> list[Path]:
    """:func:`list_images`, at least one."""
    images = list_images(folder, recursive)
    if not images:
        where = " or its sub-folders" if recursive else ""
        raise DataError(f"no images (.png, .jpg, .bmp, .tif...) in '{folder}'{where}")
    return images


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _match_masks(images: list[Path], gt_dir: Path, image_root: Path | None = None) -> list[Path]:
    """The mask of each image in ``images`` (same order), matched by file stem.

    A mask sits at the image's path relative to ``image_root`` (default: the images' folder) inside
    ``gt_dir``, or anywhere in ``gt_dir`` when its stem is unique there.
    """
    by_path: dict[str, Path] = {}
    stems: dict[str, list[str]] = {}
    for mask in list_images(gt_dir, recursive=True):
        stem = next((mask.stem.removesuffix(s) for s in MASK_SUFFIXES if mask.stem.endswith(s)), mask.stem)
        key = (mask.parent.relative_to(gt_dir) / stem).as_posix()
        if key in by_path:
            raise DataError(f"two masks for the same image: '{by_path[key]}' and '{mask}'")
        by_path[key] = mask
        stems.setdefault(key.rpartition("/")[2], []).append(key)

    masks: list[Path] = []
    for image in images:
        key = (image.parent.relative_to(image_root or image.parent) / image.stem).as_posix()
        if key not in by_path and len(stems.get(image.stem, ())) == 1:
            key = stems[image.stem][0]
        mask = by_path.pop(key, None)
        if mask is None:
            raise DataError(
                f"image '{image}' has no mask in '{gt_dir}' "
                f"(expected {image.stem}.png or {image.stem}_mask.png)"
            )
        masks.append(mask)
    if by_path:
        extra = sorted(by_path.values())
        raise DataError(
            f"mask '{extra[0]}' has no matching image in '{image_root or images[0].parent}' "
            f"({len(extra)} unmatched)"
        )
    return masks


def parse_folder(category_dir: str | os.PathLike[str]) -> tuple[list[Sample], list[Sample]]:
    """(train, test) of one MVTec-style category folder (MVTec AD, VisA 1cls or custom data).

    Deterministic: files sorted, test samples by defect type ("good" first), then by name. Images are
    listed by extension only (:func:`validate_samples` decodes them). Empty ``test/<type>`` folders
    are skipped; without ``test/`` the test list is empty (good images only still train a model).
    """
    root = _folder(category_dir)
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DataError(f"'{train_dir}' is missing: a category needs train/good/ with defect-free images")
    train = [Sample(p, 0, "good") for p in _images(train_dir, recursive=False)]
    test_root = root / "test"
    if not test_root.is_dir():  # good images only (a new inspection project): a model, no test metrics
        return train, []
    by_type = {f.name: imgs for f in _subfolders(test_root) if (imgs := list_images(f))}
    if not by_type:
        raise DataError(f"no test images in '{test_root}' (expected test/good/ and test/<defect type>/)")

    test = [Sample(p, 0, "good") for p in by_type.pop("good", [])]  # "good" first, the rest alphabetically
    gt_root = root / "ground_truth"
    for gt_dir in _subfolders(gt_root) if gt_root.is_dir() else []:
        kind, masks = gt_dir.name, list_images(gt_dir)
        if kind != "good" and kind not in by_type and masks:
            raise DataError(f"mask '{masks[0]}' has no matching image: no images in '{test_root / kind}'")
    for kind, images in by_type.items():
        gt_dir = gt_root / kind
        if not gt_root.is_dir():
            masks = [None] * len(images)
        elif gt_dir.is_dir() and list_images(gt_dir):
            masks = _match_masks(images, gt_dir)
        else:
            raise DataError(
                f"no masks in '{gt_dir}': '{gt_root}' exists, so every defect type needs masks "
                "(remove ground_truth for image-level evaluation only)"
            )
        test += [Sample(p, 1, kind, m) for p, m in zip(images, masks, strict=True)]
    return train, test


def find_categories(root: str | os.PathLike[str], strict: bool = True) -> list[Path]:
    """``[root]`` if root is a category (has ``train/``), else its category sub-folders, sorted
    (none is an error if ``strict``)."""
    base = _folder(root)
    if (base / "train").is_dir():
        return [base]
    found = [p for p in _subfolders(base) if (p / "train").is_dir()]
    if not found and strict:
        raise DataError(f"'{base}' is not a category folder (no train/) and has no category sub-folders")
    return found


def validate_samples(samples: list[Sample], what: str = "training set", max_listed: int = 5) -> None:
    """Decode every image and mask fully and check mask sizes, before any work is done; all problems
    in one DataError: ``<what>: N of M samples cannot be used``, then one line per listed file."""
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


def _elpv_rows() -> tuple[list[tuple[str, float, str]], Any]:
    """Read the ELPV label table: rows (relative path, defect probability, "mono"/"poly"), data root."""
    try:
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

    Train: 70 % (rounded down) of the defect-free cells, drawn by ``default_rng(seed).permutation`` of
    the cells sorted by name; test: the others ("good") and every cell of defect probability 1
    ("defect"). Cells the experts rated 1/3 or 2/3 are left out: either label would be noise. The PNGs
    are used in place, or (e.g. zipped) copied once to ``$MSFLOW_CACHE/elpv/<category>/`` (default
    ``~/.cache/msflow``).
    """
    if category not in ("mono", "poly"):
        raise DataError(f"elpv category must be 'mono' or 'poly', not {category!r}")
    rows, data = _elpv_rows()
    good = [rel for rel, p, kind in rows if kind == category and p == 0.0]
    bad = [rel for rel, p, kind in rows if kind == category and p == 1.0]
    order = np.random.default_rng(seed).permutation(len(good))
    n_train = len(good) * ELPV_TRAIN_PERCENT // 100
    cache = Path(os.environ.get("MSFLOW_CACHE") or Path.home() / ".cache" / "msflow") / "elpv" / category

    def sample(rel: str, label: int, kind: str) -> Sample:
        resource, dest = data / rel, cache / Path(rel).name
        if isinstance(resource, Path) and resource.is_file():
            return Sample(resource, label, kind)
        try:
            content = resource.read_bytes()
            if not (dest.is_file() and dest.stat().st_size == len(content)):
                atomic_write_bytes(dest, content)  # readers never see a half-written file
        except OSError as exc:
            raise DataError(f"elpv image '{rel}' cannot be read or cached: {exc}") from None
        return Sample(dest, label, kind)

    train = [sample(rel, 0, "good") for rel in sorted(good[i] for i in order[:n_train])]
    test = [sample(rel, 0, "good") for rel in sorted(good[i] for i in order[n_train:])]
    return train, test + [sample(rel, 1, "defect") for rel in bad]


def load_dataset(spec: str) -> tuple[str, list[Sample], list[Sample]]:
    """(name, train, test) of ``elpv:mono``, ``elpv:poly`` (named ``elpv-mono``...), one category
    folder or a plain folder of good images (named after the folder)."""
    text = str(spec)
    if text.lower().startswith("elpv:") or text.lower() == "elpv":
        category = text.partition(":")[2].strip().lower()
        if category not in ("mono", "poly"):
            raise DataError(f"unknown built-in dataset {text!r}: use 'elpv:mono' or 'elpv:poly'")
        train, test = elpv_samples(category)  # type: ignore[arg-type]
        return f"elpv-{category}", train, test
    folder = Path(text)
    categories = find_categories(folder, strict=False)
    if not categories:
        return folder.resolve().name, plain_folder(folder), []
    if categories != [folder]:
        names = ", ".join(p.name for p in categories[:5]) + (", ..." if len(categories) > 5 else "")
        raise DataError(f"'{folder}' holds several categories ({names}); pass one of them")
    return (folder.resolve().name, *parse_folder(folder))


def plain_folder(folder: str | os.PathLike[str]) -> list[Sample]:
    """Every image in ``folder`` and its sub-folders, as good training images (no test set).

    A folder with ``test/`` or ``ground_truth/`` is an MVTec category missing its ``train/good/``, not a
    folder of good images: training on it would learn its defects, so it is refused.
    """
    root = Path(folder)
    for name in ("test", "ground_truth"):
        if (root / name).is_dir():
            raise DataError(
                f"'{root}' has {name}/ but no train/good/: an MVTec-layout category needs train/good/ "
                "with the defect-free images (a plain folder of good images has no test/ or ground_truth/)"
            )
    return [Sample(p, 0, "good") for p in _images(root)]


def folder_samples(
    normal_dir: str, abnormal_dir: str | None, mask_dir: str | None, test_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """anomalib's ``Folder`` layout: (train, test) from a folder of good images, optionally with a folder
    of defective ones and their masks.

    Without ``abnormal_dir`` every good image trains (no test set). With it, ``test_fraction`` of the
    good images (seeded draw) joins the defective ones in the test set and is never trained on. A
    defective image's defect type is its sub-folder in ``abnormal_dir`` (the folder's name if flat).
    """
    normal = plain_folder(normal_dir)
    if not abnormal_dir:
        return normal, []
    root = Path(abnormal_dir)
    images = _images(root)
    masks = _match_masks(images, Path(mask_dir), root) if mask_dir else [None] * len(images)
    kinds = [p.relative_to(root).parts[0] if p.parent != root else root.resolve().name for p in images]
    if len(normal) < 2:
        raise DataError(f"'{normal_dir}' needs at least 2 good images: some train, some test")
    n_test = min(max(1, round(test_fraction * len(normal))), len(normal) - 1)
    held = set(np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(normal))[:n_test].tolist())
    train = [s for i, s in enumerate(normal) if i not in held]
    test = [s for i, s in enumerate(normal) if i in held]
    defects = [Sample(p, 1, k, m) for p, k, m in zip(images, kinds, masks, strict=True)]
    return train, test + sorted(defects, key=lambda s: (s.defect_type, str(s.image)))


def load_data(data: DataConfig) -> tuple[str, list[Sample], list[Sample]]:
    """(name, train, test) of a run's data section: its three folders if given, else ``dataset``."""
    if not data.normal_dir:
        return load_dataset(data.dataset)
    train, test = folder_samples(data.normal_dir, data.abnormal_dir, data.mask_dir, data.test_fraction)
    return Path(data.normal_dir).resolve().name, train, test


def load_test_set(data: DataConfig | str) -> tuple[str, list[Sample]]:
    """(name, test samples) of a run's data section or of a dataset (:func:`load_dataset`), every file
    checked; a folder of good images only has none."""
    name, _, test = load_data(data) if isinstance(data, DataConfig) else load_dataset(data)
    if test:
        validate_samples(test, f"test set of '{name}'")
    return name, test


class ImageDataset(Dataset):
    """Samples as model inputs (the official transform, see :func:`msflow.data.images.to_tensor`):
    items ``image`` (3, H, W) float32, ``label``, ``index`` and ``original_size`` (the file's (width,
    height), int64). Masks are not read here: metrics compare maps and masks at the original size."""

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
