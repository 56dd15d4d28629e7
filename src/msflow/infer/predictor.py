"""Running a model over samples: scores and maps at each image's original resolution."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from msflow.data.datasets import ImageDataset, Sample
from msflow.evaluate.evaluation import Predictions
from msflow.model.anomaly_map import to_original_size
from msflow.model.msflow import MSFlow


@torch.no_grad()
def predict_samples(
    model: MSFlow,
    samples: list[Sample],
    device: torch.device,
    batch_size: int = 8,
    keep_maps: bool = True,
    workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> Predictions:
    """Run the model on samples; maps are resized back to each image's original size."""
    model.eval()
    loader = DataLoader(
        ImageDataset(samples, model.config.image_size), batch_size=batch_size, num_workers=workers
    )
    scores, pixel_maps, image_maps = [], [], []
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out = model.predict(batch["image"].to(device))
        scores.append(out.scores.float().cpu())
        if keep_maps:
            for i, (w, h) in enumerate(batch["original_size"].tolist()):
                pixel_maps.append(to_original_size(out.pixel_map[i], h, w))
                image_maps.append(to_original_size(out.image_map[i], h, w))
    return Predictions(
        scores=torch.cat(scores).numpy() if scores else np.zeros(0),
        labels=np.array([s.label for s in samples]),
        defect_types=[s.defect_type for s in samples],
        pixel_maps=pixel_maps,
        image_maps=image_maps,
        seconds=time.perf_counter() - start,
    )
