"""The feature cache: every training image (every tile of it, with ``tile``) goes through the frozen
backbone exactly once.

Features are stored per scale as (N, C_l, H_l, W_l) float32 arrays, in memory or, when they would
not fit comfortably, in memory-mapped files on disk. The per-channel standardisation is fitted on
them and applied in place, so training reads ready-to-use batches.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from msflow.data.datasets import ImageDataset, Sample
from msflow.data.tiles import TileDataset, training_grids
from msflow.logs import Progress
from msflow.model.msflow import MSFlow
from msflow.train.distributed import Distributed

MEMORY_FRACTION = 0.4  # "auto" keeps the cache in RAM when it takes under 40 % of what is available


def cache_location(need_bytes: int, available_bytes: int) -> str:
    """Where ``cache="auto"`` puts the features: "memory" when they take under :data:`MEMORY_FRACTION`
    of the memory available without swapping, else "disk" (memory-mapped files, read a batch at a time).
    The rest is left for the model, the training step, the evaluation and the rest of the machine."""
    return "memory" if need_bytes < MEMORY_FRACTION * available_bytes else "disk"


def training_inputs(model: MSFlow, samples: list[Sample]) -> Dataset:
    """The model inputs the flows learn: every tile of every image with ``tile`` (an image smaller than
    a tile is refused, naming it), else every image resized."""
    config = model.config
    if config.tile:
        return TileDataset(
            samples, training_grids(samples, config.tile, config.tile_overlap), config.image_size
        )
    return ImageDataset(samples, config.image_size)


class FeatureCache:
    """Per-scale feature arrays for N images; ``batch(indices)`` returns float32 tensors."""

    def __init__(self, arrays: list[np.ndarray], folder: tempfile.TemporaryDirectory | None = None) -> None:
        self.arrays = arrays
        self._folder = folder  # keeps the memory-mapped files alive as long as the cache

    def __len__(self) -> int:
        return len(self.arrays[0])

    def batch(self, indices: torch.Tensor) -> list[torch.Tensor]:
        # Sorted reads are sequential on disk; the order within a batch is irrelevant.
        idx = np.sort(indices.numpy())
        return [torch.from_numpy(np.ascontiguousarray(a[idx])) for a in self.arrays]

    def batches(self, batch_size: int, rows: range | None = None) -> Iterator[list[torch.Tensor]]:
        """Consecutive batches of ``rows`` (default: all of them), one at a time (a disk cache is never
        read whole)."""
        rows = range(len(self)) if rows is None else rows
        for i in range(rows.start, rows.stop, batch_size):
            yield self.batch(torch.arange(i, min(i + batch_size, rows.stop)))

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: MSFlow,
        samples: list[Sample],
        device: torch.device,
        batch_size: int = 8,
        where: str = "auto",
        workers: int = 0,
        progress: bool = True,
        dist: Distributed | None = None,
        fit_statistics: bool = True,
    ) -> FeatureCache:
        """Extract (a row per image, or per tile), then standardise in place, fitting the statistics first
        unless ``fit_statistics`` is False (held-out images take the training ones'). With ``dist`` each
        rank does its shard, the statistics are all-reduced and the shards shared with every rank."""
        dist = dist or Distributed()
        dataset = training_inputs(model, samples)
        n = len(dataset)
        rows = dist.shard(n)
        shapes = model.feature_shapes
        need = n * sum(c * h * w for c, h, w in shapes) * 4
        if where == "auto":
            where = cache_location(need, psutil.virtual_memory().available)
        folder = None
        if where == "disk":
            folder = tempfile.TemporaryDirectory(prefix="msflow-features-")
            arrays = [
                np.lib.format.open_memmap(
                    Path(folder.name) / f"scale{i}.npy", mode="w+", dtype=np.float32, shape=(n, *s)
                )
                for i, s in enumerate(shapes)
            ]
        else:
            arrays = [np.empty((n, *s), dtype=np.float32) for s in shapes]
        loader = DataLoader(
            Subset(dataset, range(rows.start, rows.stop)), batch_size=batch_size, num_workers=workers
        )
        start = rows.start
        desc = "extract features" if fit_statistics else "extract held-out features"
        with Progress(desc=desc, total=len(rows), unit="images", enabled=progress) as bar:
            for batch in loader:
                feats = model.extract(batch["image"].to(device))
                for a, f in zip(arrays, feats, strict=True):
                    a[start : start + len(f)] = f.float().cpu().numpy()
                start += len(batch["image"])
                bar.update(len(batch["image"]))
        cache = cls(arrays, folder)
        if fit_statistics:
            model.fit_standardization(cache.batches(64, rows), reduce=dist.all_sum)
        # In chunks of rows: a disk cache never has to fit in memory.
        for i, chunks in zip(range(rows.start, rows.stop, 64), cache.batches(64, rows), strict=True):
            for standardize, a, chunk in zip(model.standardizers, arrays, chunks, strict=True):
                a[i : i + len(chunk)] = standardize(chunk.to(device)).cpu().numpy()
        dist.share_shards(arrays)
        return cache
