"""Many categories at once: each category's fit as a Ray task (``msflow benchmark --executor ray``).

Ray (an optional extra: ``pip install "msflow[cluster]"``) schedules one task per category on a local
instance, or on a running cluster given its address. Each task reserves ``num_cpus``/``num_gpus`` and
runs :func:`msflow.train.benchmark.run_category` there, so a task is exactly one sequential category:
same code, same seed, same metrics. Rows are yielded in the order the tasks finish.

Run folders are written by the tasks to the path the driver gave, so on a cluster it must be a
filesystem that every node mounts at the same path (NFS, a cloud file share); the dataset root too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from msflow.config import Config
from msflow.errors import MSFlowError


def require_ray():  # -> the ray module
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MSFlowError(
            '--executor ray needs Ray, which is not installed: pip install "msflow[cluster]"'
        ) from None
    return ray


def _category_task(name: str, cfg: Config, run_dir: str, threads: int) -> dict:
    """Runs inside a Ray worker: one category, with as many torch threads as CPUs reserved."""
    from msflow.train.benchmark import run_category

    torch.set_num_threads(max(1, threads))
    return run_category(name, cfg, Path(run_dir), progress=False)


def run_on_ray(
    jobs: list[tuple[str, Config, Path]],
    address: str | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0.0,
) -> Iterator[dict]:
    """Yield one table row per ``(category, config, run folder)`` job as its Ray task finishes.

    A task that fails in a way :func:`run_category` does not catch (a crashed worker, a lost node after
    its retry) gives a row with the error; the other tasks go on.
    """
    if cpus_per_task < 1 or gpus_per_task < 0:
        raise MSFlowError(
            f"--cpus-per-task must be >= 1 and --gpus-per-task >= 0, got {cpus_per_task}, {gpus_per_task}"
        )
    ray = require_ray()
    if not jobs:
        return
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address or os.environ.get("RAY_ADDRESS"):  # RAY_ADDRESS: set inside `ray job submit`
                ray.init(address=address)
            else:
                ray.init(include_dashboard=False)  # a local instance with this machine's CPUs and GPUs
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"at '{address}'" if address else "locally"
            raise MSFlowError(f"cannot start or reach Ray {where}: {str(err).splitlines()[0]}") from None
    total = ray.cluster_resources()
    if total.get("CPU", 0) < cpus_per_task or total.get("GPU", 0) < gpus_per_task:
        raise MSFlowError(
            f"each task asks for {cpus_per_task} CPU(s) and {gpus_per_task} GPU(s) but the Ray cluster has "
            f"{total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s)"
        )
    # One retry if a worker or node dies: run_category resumes from the category's last checkpoint.
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=1)(_category_task)
    pending = {task.remote(name, cfg, str(run_dir), cpus_per_task): name for name, cfg, run_dir in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as err:
                    cause = getattr(err, "cause", None) or err
                    text = str(cause).strip().splitlines()
                    yield {"category": name, "error": f"{type(cause).__name__}: {text[-1] if text else ''}"}
    finally:
        for ref in pending:  # interrupted driver: do not leave tasks running
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
