"""Where a flow-training step's time goes, and what each speed lever buys (issue 12, point 3).

Run from a source checkout::

    python -m benchmarks.train_profile                      # lite0, 256 px, batch 8, 1 and 2 threads
    python -m benchmarks.train_profile --profile            # + torch.profiler's op table (default path)
    python -m benchmarks.train_profile --convs              # + each flow conv's GFLOP/s, fwd / dX / dW
    python -m benchmarks.train_profile --levers plain default compile   # compile time measured apart

Each lever times :func:`msflow.train.loop.train_flows` itself (flows forward, loss, backward, clipping,
Adam, the loop's finite checks) for one epoch over an in-memory cache of random tensors shaped like the
cached features. The levers run interleaved, ``rounds`` times, so that load from other processes hits
them alike; medians. Besides wall-clock img/s it reports img/s in CPU time of this process: with one
thread that is the time the step actually ran, far less disturbed by a busy machine than the wall clock.
GFLOP/s use the FLOPs of one step counted by torch (a multiply-add is 2) and the float32 matmul ceiling
measured in the same run, the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Lever:
    """One way of running the training step; ``plain`` is torch's defaults, ``default`` msflow's."""

    help: str
    layout: str = "auto"  # MSFlow.flow_layout
    optimizer: str = "default"  # default (msflow's make_optimizer), loop, foreach, fused
    mkldnn: bool = True
    batch_scale: int = 1  # batch = batch_size * batch_scale
    compile_mode: str | None = None  # torch.compile of MSFlow.flow


LEVERS = {
    "plain": Lever(
        "NCHW tensors, Adam's for-loop kernel (torch's defaults on the CPU)", "contiguous", "loop"
    ),
    "default": Lever("what msflow train runs: layout auto, make_optimizer"),
    "channels_last": Lever("layout auto (channels-last on oneDNN CPUs), Adam's for-loop", optimizer="loop"),
    "fused_adam": Lever("NCHW tensors, fused Adam", "contiguous", "fused"),
    "foreach_adam": Lever("layout auto, foreach Adam", optimizer="foreach"),
    "native_conv": Lever(
        "default, but oneDNN off: torch's native (im2col + GEMM) convolutions", mkldnn=False
    ),
    "batch32": Lever(
        "default at 4x the batch (needs the lr scaled; accuracy not measured here)", batch_scale=4
    ),
    "compile": Lever("default + torch.compile(model.flow), mode default", compile_mode="default"),
    "compile_autotune": Lever(
        "default + torch.compile(model.flow), max-autotune-no-cudagraphs",
        compile_mode="max-autotune-no-cudagraphs",
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> str:
    """The 1/5/15-minute load averages, for the record beside every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def _clock() -> Iterator[dict]:
    """Wall and process-CPU seconds of the ``with`` body."""
    out: dict = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


def matmul_ceiling(size: int = 1024, repeats: int = 3) -> dict:
    """float32 GFLOP/s of a square matmul: best of ``repeats`` (wall and CPU time)."""
    import torch

    a = torch.randn(size, size)
    a @ a
    best = {"wall": 0.0, "cpu": 0.0}
    for _ in range(repeats):
        with _clock() as t:
            for _ in range(4):
                a @ a
        for k in best:
            best[k] = max(best[k], 4 * 2 * size**3 / t[k] / GB)
    return best


class Trainer:
    """A model, a random feature cache and the loop, for one lever at a time."""

    def __init__(self, backbone: str, image_size: int, batch_size: int, steps: int, seed: int = 0) -> None:
        import numpy as np
        import torch

        from msflow.config import ModelConfig
        from msflow.model.msflow import MSFlow
        from msflow.train.features import FeatureCache

        torch.manual_seed(seed)
        # Random backbone weights: only the flows are timed, and their cost does not depend on them.
        self.model = MSFlow(ModelConfig(backbone=backbone, image_size=image_size, pretrained=False))
        self.batch_size, self.steps = batch_size, steps
        rng = np.random.default_rng(seed)
        n = batch_size * steps * 4  # enough for the largest batch_scale
        self.cache = FeatureCache(
            [rng.standard_normal((n, c, h, w), dtype=np.float32) for c, h, w in self.model.feature_shapes]
        )
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._compiled: dict[str, Callable] = {}
        self.compile_seconds: dict[str, float] = {}

    def optimizer(self, kind: str):
        import torch

        if kind not in self._optimizers:
            params = self.model.trainable_parameters()
            if kind == "default":
                from msflow.train.loop import make_optimizer

                self._optimizers[kind] = make_optimizer(params, 1e-4, torch.device("cpu"))
            else:  # the "plain" lever also runs on a checkout that predates make_optimizer
                flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
                self._optimizers[kind] = torch.optim.Adam(params, lr=1e-4, **flags[kind])
        return self._optimizers[kind]

    def run(self, lever: Lever) -> tuple[dict, int]:
        """One epoch of train_flows under ``lever``: ({wall, cpu} seconds, images)."""
        import torch

        from msflow.config import TrainConfig
        from msflow.train.features import FeatureCache
        from msflow.train.loop import TrainState, train_flows

        model = self.model
        model.flow_layout = lever.layout
        bs = self.batch_size * lever.batch_scale
        part = FeatureCache([a[: bs * self.steps] for a in self.cache.arrays])
        # Exactly one epoch: no plateau rule (a checkout that predates it has no ``stop``).
        stop = {"stop": "schedule"} if "stop" in TrainConfig.__dataclass_fields__ else {}
        cfg = TrainConfig(epochs=1, batch_size=bs, amp=False, **stop)
        if lever.compile_mode:
            if lever.compile_mode not in self._compiled:
                self._compiled[lever.compile_mode] = torch.compile(
                    type(model).flow.__get__(model), mode=lever.compile_mode
                )
            model.flow = self._compiled[lever.compile_mode]  # train_flows calls model.flow
        try:
            with torch.backends.mkldnn.flags(enabled=lever.mkldnn), _clock() as t:
                train_flows(
                    model,
                    part,
                    cfg,
                    torch.device("cpu"),
                    TrainState(),
                    self.optimizer(lever.optimizer),
                    progress=False,
                )
        finally:
            if lever.compile_mode:
                del model.flow  # back to the class's method
        return t, bs * self.steps

    def step_gflop(self) -> float:
        """GFLOP of one training step per image (forward + backward of the flows; a multiply-add is 2)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from msflow.model.loss import nll

        feats = self.cache.batch(torch.arange(self.batch_size))
        with FlopCounterMode(display=False) as counter:
            out = self.model.flow(feats)
            nll(out.zs, out.log_det).mean().backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch_size / GB


def measure(
    names: list[str],
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    batch_size: int = 8,
    steps: int = 3,
    rounds: int = 3,
    threads: int = 1,
) -> dict:
    """img/s, GFLOP/s and fraction of the matmul ceiling of each lever at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    trainer = Trainer(backbone, image_size, batch_size, steps)
    gflop = trainer.step_gflop()
    levers = {name: LEVERS[name] for name in names}
    warm: dict[str, float] = {}
    for name, lever in levers.items():  # warm-up: optimizer state, kernels, compilation
        with _clock() as t:
            trainer.run(lever)
        warm[name] = t["wall"]
        if lever.compile_mode:
            _log(f"  {name}: compiled and ran one epoch in {t['wall']:.0f} s (load {load()})")
    times: dict[str, list[tuple[dict, int]]] = {name: [] for name in levers}
    for _ in range(rounds):
        for name, lever in levers.items():
            times[name].append(trainer.run(lever))
    ceiling = matmul_ceiling()
    out = {"threads": threads, "gflop_per_image": gflop, "matmul_gflops": ceiling, "levers": {}}
    for name, runs in times.items():
        images = runs[0][1]
        rate = {k: images / statistics.median(t[k] for t, _ in runs) for k in ("wall", "cpu")}
        out["levers"][name] = {
            "img_per_s": rate["wall"],
            "img_per_cpu_s": rate["cpu"],
            "gflops": rate["wall"] * gflop,
            "gflops_cpu": rate["cpu"] * gflop,
            "fraction_of_ceiling": rate["wall"] * gflop / ceiling["wall"],
            "fraction_of_ceiling_cpu": rate["cpu"] * gflop / ceiling["cpu"],
            "first_epoch_seconds": warm[name],
        }
    first = out["levers"][names[0]]
    for r in out["levers"].values():
        r["speedup"] = r["img_per_s"] / first["img_per_s"]
        r["speedup_cpu"] = r["img_per_cpu_s"] / first["img_per_cpu_s"]
    out["load"] = load()
    return out


def profile_table(trainer: Trainer, lever: Lever, rows: int = 25) -> str:
    """torch.profiler's op table (self CPU time) over one epoch of ``lever``."""
    from torch.profiler import ProfilerActivity, profile

    trainer.run(lever)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run(lever)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def conv_table(trainer: Trainer) -> list[str]:
    """GFLOP/s (CPU time) of each distinct flow convolution: forward, input and weight gradients."""
    import torch
    import torch.nn.functional as F

    shapes = sorted(
        {
            (m.in_channels, m.out_channels, h, w)
            for (c, h, w), flow in zip(
                trainer.model.feature_shapes, trainer.model.parallel_flows, strict=True
            )
            for m in flow.modules()
            if isinstance(m, torch.nn.Conv2d)
        },
        reverse=True,
    )
    b = trainer.batch_size
    lines = [f"  {f'conv (B={b})':<22}{'layout':>8}{'fwd':>8}{'dX':>8}{'dW':>8}  GFLOP/s, CPU time"]
    for cin, cout, h, w in shapes:
        flop = 2 * b * h * w * cin * cout * 9
        for layout in ("nchw", "nhwc"):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            x = torch.randn(b, cin, h, w).contiguous(memory_format=fmt)
            wt = torch.randn(cout, cin, 3, 3).contiguous(memory_format=fmt)
            g = torch.randn(b, cout, h, w).contiguous(memory_format=fmt)

            def back(mask, x=x, wt=wt, g=g, cout=cout):
                return torch.ops.aten.convolution_backward(
                    g, x, wt, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
                )

            cells = []
            for fn in (
                lambda x=x, wt=wt: F.conv2d(x, wt, padding=1),
                lambda: back([True, False, False]),
                lambda: back([False, True, True]),
            ):
                fn()
                best = 0.0
                for _ in range(3):
                    with _clock() as t:
                        fn()
                    best = max(best, flop / t["cpu"] / GB)
                cells.append(f"{best:8.1f}")
            lines.append(f"  {f'{cin}->{cout} @ {h}x{w}':<22}{layout:>8}" + "".join(cells))
    return lines


def format_result(res: dict) -> list[str]:
    ce = res["matmul_gflops"]
    lines = [
        f"{res['threads']} thread(s): {res['gflop_per_image']:.3f} GFLOP per image per step; float32 matmul "
        f"ceiling {ce['wall']:.1f} GFLOP/s (wall), {ce['cpu']:.1f} (CPU time); load {res['load']}",
        f"  {'lever':<18}{'img/s':>8}{'ratio':>8}{'img/CPU-s':>11}{'ratio':>8}{'GFLOP/s':>9}"
        f"{'of ceiling':>12}",
    ]
    for name, r in res["levers"].items():
        lines.append(
            f"  {name:<18}{r['img_per_s']:8.2f}{r['speedup']:7.2f}x{r['img_per_cpu_s']:11.2f}"
            f"{r['speedup_cpu']:7.2f}x{r['gflops']:9.1f}{100 * r['fraction_of_ceiling']:11.0f}%"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed epochs per lever")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--levers",
        nargs="+",
        default=["plain", "default", "channels_last", "fused_adam"],
        choices=sorted(LEVERS),
    )
    parser.add_argument("--profile", action="store_true", help="print the op table of the default path")
    parser.add_argument("--convs", action="store_true", help="print each flow conv's GFLOP/s")
    args = parser.parse_args(argv)
    import torch

    print(
        f"flow training of {args.backbone} at {args.image_size} px, batch {args.batch_size}, torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs, torch default threads {torch.get_num_threads()}"
    )
    for name in args.levers:
        print(f"  {name:<18}{LEVERS[name].help}")
    for threads in args.threads:
        res = measure(
            args.levers, args.backbone, args.image_size, args.batch_size, args.steps, args.rounds, threads
        )
        print("\n".join(format_result(res)), flush=True)
    if args.profile or args.convs:
        torch.set_num_threads(args.threads[0])
        trainer = Trainer(args.backbone, args.image_size, args.batch_size, args.steps)
        if args.convs:
            print(f"\nflow convolutions, {args.threads[0]} thread(s), load {load()}")
            print("\n".join(conv_table(trainer)))
        if args.profile:
            print(f"\nop profile of the default path, {args.threads[0]} thread(s), load {load()}")
            print(profile_table(trainer, LEVERS["default"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
