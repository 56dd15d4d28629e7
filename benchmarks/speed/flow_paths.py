"""Flow training on two paths: torch's defaults ("plain") against what ``msflow train`` runs ("default").

The speed harness's EfficientNet-Lite0 phase (:func:`benchmarks.speed.training.phase_train_lite0`;
``--skip-lite0`` leaves it out) calls :func:`measure`. Each path times
:func:`msflow.train.loop.train_flows` itself (flows forward, loss, backward, clipping, Adam, the loop's
finite checks) for one epoch over an in-memory cache of random tensors shaped like the cached
features. The two paths run interleaved, ``rounds`` times, so that load from other processes hits them
alike; medians are kept. Besides wall-clock img/s it reports img/s in CPU time of this process: with
one thread that is the time the step actually ran, far less disturbed by a busy machine. GFLOP/s use
the FLOPs of one step counted by torch (a multiply-add is 2).

The study that chose the default path timed more levers (fused Adam, oneDNN off, ``torch.compile``,
4x the batch, each convolution's GFLOP/s, the op profile): ``benchmarks/train_profile.py`` of commit
fe1c168, removed since; docs/results.md ("Training speed of the default model") keeps its figures.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

from benchmarks.speed.machine import GB, count_flops

# path -> (MSFlow.flow_layout, Adam's kernel)
PATHS = {
    "plain": ("contiguous", "for-loop"),  # NCHW tensors, per-tensor Adam: torch's defaults on the CPU
    "default": ("auto", "make_optimizer"),  # channels-last on oneDNN CPUs, msflow's optimizer
}


@contextlib.contextmanager
def clock() -> Iterator[dict]:
    """Wall and process-CPU seconds of the ``with`` body, in the yielded dict once it ends."""
    out: dict = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


class FlowTrainer:
    """A model with random backbone weights, a random feature cache and one optimizer per path."""

    def __init__(self, backbone: str, image_size: int, batch_size: int, steps: int, seed: int = 0) -> None:
        import numpy as np
        import torch

        from msflow.config import ModelConfig
        from msflow.model.msflow import MSFlow
        from msflow.train.features import FeatureCache

        torch.manual_seed(seed)
        # Only the flows are timed, and their cost does not depend on the backbone's weights.
        self.model = MSFlow(ModelConfig(backbone=backbone, image_size=image_size, pretrained=False))
        self.batch_size, self.steps = batch_size, steps
        rng = np.random.default_rng(seed)
        n = batch_size * steps
        self.cache = FeatureCache(
            [rng.standard_normal((n, c, h, w), dtype=np.float32) for c, h, w in self.model.feature_shapes]
        )
        self.optimizers = {path: self._optimizer(kernel) for path, (_, kernel) in PATHS.items()}

    def _optimizer(self, kernel: str):
        import torch

        from msflow.train.loop import make_optimizer

        params = self.model.trainable_parameters()
        if kernel == "make_optimizer":
            return make_optimizer(params, 1e-4, torch.device("cpu"))
        return torch.optim.Adam(params, lr=1e-4, foreach=False)

    def epoch(self, path: str) -> dict:
        """One epoch of train_flows on ``path``: {wall, cpu} seconds."""
        import torch

        from msflow.config import TrainConfig
        from msflow.train.loop import TrainState, train_flows

        self.model.flow_layout = PATHS[path][0]
        cfg = TrainConfig(epochs=1, batch_size=self.batch_size, amp=False, stop="schedule")
        with clock() as t:
            train_flows(
                self.model,
                self.cache,
                cfg,
                torch.device("cpu"),
                TrainState(),
                self.optimizers[path],
                progress=False,
            )
        return t

    def step_gflop(self) -> float:
        """GFLOP of one training step per image (forward and backward of the flows)."""
        import torch

        from msflow.model.loss import nll

        feats = self.cache.batch(torch.arange(self.batch_size))

        def step() -> None:
            out = self.model.flow(feats)
            nll(out.zs, out.log_det).mean().backward()

        flops = count_flops(step)
        self.model.zero_grad(set_to_none=True)
        return flops / self.batch_size / GB


def measure(
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    batch_size: int = 8,
    steps: int = 3,
    rounds: int = 3,
    threads: int = 1,
) -> dict:
    """img/s (wall and CPU time) and GFLOP/s of each path at ``threads`` threads; speed-ups over plain."""
    import torch

    torch.set_num_threads(threads)
    trainer = FlowTrainer(backbone, image_size, batch_size, steps)
    gflop = trainer.step_gflop()
    first = {path: trainer.epoch(path)["wall"] for path in PATHS}  # warm-up: optimizer state, kernels
    times: dict[str, list[dict]] = {path: [] for path in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            times[path].append(trainer.epoch(path))
    images = batch_size * steps
    levers = {}
    for path, runs in times.items():
        rate = {k: images / statistics.median(t[k] for t in runs) for k in ("wall", "cpu")}
        levers[path] = {
            "img_per_s": rate["wall"],
            "img_per_cpu_s": rate["cpu"],
            "gflops": rate["wall"] * gflop,
            "gflops_cpu": rate["cpu"] * gflop,
            "first_epoch_seconds": first[path],
        }
    for r in levers.values():
        r["speedup"] = r["img_per_s"] / levers["plain"]["img_per_s"]
        r["speedup_cpu"] = r["img_per_cpu_s"] / levers["plain"]["img_per_cpu_s"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"threads": threads, "gflop_per_image": gflop, "levers": levers, "load": load}
