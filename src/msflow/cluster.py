"""Running independent jobs as Ray tasks: many categories (``benchmark``), a very large folder (``predict``).

Ray (an optional extra: ``pip install "msflow[cluster]"``) schedules each job as a task that reserves
``num_cpus``/``num_gpus``, on a local instance or on a running cluster given its address. A job is a
plain function call, so a task computes exactly what the sequential run computes. How to run it on a
cluster (a filesystem every node mounts at the same path, retries of lost workers) is docs/scaling.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from msflow.errors import MSFlowError, require_extra

# Runs of a task after its worker died (Ray's own default is 3): one retry rides out a lost worker or
# node; a task that kills its worker twice (out of memory, say) is reported as failed instead.
TASK_RETRIES = 1


def require_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    return require_extra("ray", "cluster", "--executor ray")


def run_tasks(
    fn: Callable[..., Any],
    jobs: list[tuple],
    address: str | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0.0,
) -> Iterator[tuple[int, Any, str | None]]:
    """Run ``fn(*job)`` for every job as a Ray task; yield ``(job index, result, error)`` as each ends.

    ``error`` is None on success, else one line (the result is then None). The driver joins the cluster
    at ``address`` (or ``$RAY_ADDRESS``, set inside ``ray job submit``), else starts a local instance,
    unless Ray is already initialised; an instance started here is shut down at the end. A task is
    retried (:data:`TASK_RETRIES` times) if its worker or node dies, so jobs must be safe to repeat.
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
            if address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=address)
            else:
                ray.init(include_dashboard=False)  # a local instance with this machine's CPUs and GPUs
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"at '{address}'" if address else "locally"
            raise MSFlowError(f"cannot start or reach Ray {where}: {str(err).splitlines()[0]}") from None
    try:
        total = ray.cluster_resources()
        if total.get("CPU", 0) < cpus_per_task or total.get("GPU", 0) < gpus_per_task:
            raise MSFlowError(
                f"each task asks for {cpus_per_task} CPU(s) and {gpus_per_task:g} GPU(s) but the Ray cluster "
                f"has {total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s)"
            )
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=TASK_RETRIES)(
            msflow_task
        )
        pending = {task.remote(fn, cpus_per_task, *job): i for i, job in enumerate(jobs)}
        yield from _as_they_finish(ray, pending)
    finally:
        if started_here:
            ray.shutdown()


def _as_they_finish(ray: Any, pending: dict[Any, int]) -> Iterator[tuple[int, Any, str | None]]:
    """``(job index, result, error)`` of each task in ``pending`` (task -> index) as it ends."""
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None) or err
                lines = str(cause).strip().splitlines()
                yield index, None, f"{type(cause).__name__}: {lines[-1] if lines else ''}"
            else:
                yield index, result, None
    finally:
        for ref in pending:  # an interrupted driver leaves no tasks running
            ray.cancel(ref, force=True)


def msflow_task(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """Inside a Ray worker: as many torch threads as CPUs reserved, then the job."""
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(*args)
