"""Cache a run's held-out good images and test set as model inputs (npz)."""
import sys, numpy as np, yaml
from pathlib import Path
from msflow.data.datasets import load_dataset
from msflow.data.images import read_image, to_tensor, read_mask, resize_mask
from msflow.train.fit import split_holdout

run, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = yaml.safe_load((run / "config.yaml").read_text())
size = cfg["model"]["image_size"]; size = tuple(size) if isinstance(size, list) else size
_, train, test = load_dataset(cfg["data"]["dataset"])
fit, hold = split_holdout(train, cfg["data"]["holdout_fraction"], cfg["train"]["seed"])
def arr(samples): return np.stack([to_tensor(read_image(s.image), size).numpy() for s in samples])
h, w = (size, size) if isinstance(size, int) else size
masks = []
for s in test:
    if s.mask is None: masks.append(np.zeros((h, w), np.uint8))
    else: masks.append(resize_mask(read_mask(s.mask), (h, w)).astype(np.uint8))
rng = np.random.default_rng(0)
extra = [fit[i] for i in sorted(rng.choice(len(fit), size=min(128, len(fit)), replace=False))]
np.savez(out, holdout=arr(hold), test=arr(test), labels=np.array([s.label for s in test]),
         masks=np.stack(masks), fit=arr(extra))
print(len(hold), len(test), len(extra))
