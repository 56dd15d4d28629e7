"""Data-parallel training of one model on several processes (torchrun), all in this one file.

``torchrun --nproc-per-node N -m msflow train ...`` starts N copies of the same command and tells each
its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). :func:`fit` asks
:meth:`Distributed.from_environment` for a context; without those variables it is the single-process
context, whose every method is a no-op, so the training code has one path.

How the work is shared, and why the result equals a single-process run with the same settings:

- **Features.** Each rank extracts a contiguous shard of the training images (the expensive part).
  The standardisation sums (float64) are all-reduced, so every rank gets the statistics of all images;
  each rank standardises its shard, then the shards are broadcast so every rank holds the whole cache
  (global batches are drawn from a permutation of all images, as in one process).
- **Steps.** Every rank draws the same seeded per-epoch permutation and cuts it into the same global
  batches; each global batch is split across ranks (``tensor_split``: sizes differ by at most one).
  The flows are wrapped in DistributedDataParallel, which averages gradients over ranks; each rank's
  loss is its sum of per-image losses times ``world_size / global_batch``, so that average is exactly
  the gradient of the single-process batch mean even when the batch does not split evenly.
- **Consistent decisions.** The logged loss and the non-finite check use the all-reduced sum, so all
  ranks roll back (or not) together; the gradient norm is computed from all-reduced gradients.
- **Global normalisation.** Each rank computes per-image maxima of its shard; they are gathered in
  rank (= image) order and every rank takes the same mean.
- **Run folder.** Rank 0 alone writes it (config, log, checkpoints, model, report). Score selection
  (``score: auto``) runs on rank 0 only; the other ranks free their features and wait for its
  decisions (in a group of their own with a long timeout).
- **Calibration and test evaluation.** Each rank predicts a contiguous shard of the held-out (then
  the test) images into its own bounded-memory accumulator (:mod:`msflow.evaluate.streaming`);
  :meth:`Distributed.merge_to_main` sums the histograms (int64 counts exactly) and gathers the
  per-image scores in image order, and rank 0 computes the threshold, then the metrics and the
  report, as one process would; all ranks return its metrics.

Failure: a collective that loses a peer raises on the survivors, torchrun sends the rest SIGTERM; both
end as one-line :class:`DistributedError` messages. Checkpoints are written by rank 0 every epoch, and
``--resume`` makes every rank load the same one (on several nodes the run folder must be on a shared
filesystem).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from types import FrameType, TracebackType
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from msflow.errors import DistributedError, MSFlowError
from msflow.evaluate.streaming import Mergeable
from msflow.model.msflow import FlowOutput, MSFlow

TIMEOUT_ENV = "MSFLOW_DIST_TIMEOUT"  # seconds a collective waits for a missing rank (default below)
DEFAULT_TIMEOUT_S = 1800
# The other ranks wait for rank 0's evaluation (as long as the test set takes) in a separate group;
# a rank 0 that dies still ends the wait at once (its connections close).
FINAL_WAIT = timedelta(hours=24)
# ---- test seam (tests/test_distributed.py): "RANK:EPOCH" makes that rank SIGKILL itself after that
# epoch's checkpoint, to show that the job ends cleanly and --resume continues it. Read only here. ----
KILL_SEAM_ENV = "MSFLOW_TEST_KILL_RANK"
M = TypeVar("M", bound=Mergeable)
_SHARE_ROWS = 64  # rows per broadcast when the shards are shared: bounded memory for any cache size


class _Flows(nn.Module):
    """The trainable part of MSFlow as a module, for DDP: the flows are registered, the backbone is not
    (it is frozen and identical on every rank, so DDP neither broadcasts nor watches it)."""

    def __init__(self, model: MSFlow) -> None:
        super().__init__()
        self.parallel_flows = model.parallel_flows
        self.fusion_flow = model.fusion_flow
        self._flow = model.flow  # a bound method, not a submodule

    def forward(self, feats: list[Tensor]) -> FlowOutput:
        return self._flow(feats)


class Distributed:
    """Where this process stands in a data-parallel job; ``Distributed()`` is the single process."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.comm_device = torch.device("cpu")  # where collective tensors live (CUDA for nccl)
        self._owns_group = False
        self._failing = False
        self._previous_sigterm: object = signal.SIG_DFL
        self._wait_group: object = None

    @classmethod
    def from_environment(cls) -> Distributed:
        """The context torchrun describes in the environment, or the single process without it."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise MSFlowError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from err
        if world < 1 or not 0 <= rank < world:
            raise MSFlowError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    # -- life cycle ----------------------------------------------------------------------------------
    def setup(self, device: torch.device, batch_size: int) -> torch.device:
        """Join the process group (nccl for CUDA, gloo otherwise); returns this rank's device."""
        if not self.enabled:
            return device
        if batch_size < self.world_size:  # every rank needs at least one image of each full batch
            raise MSFlowError(
                f"batch size {batch_size} is smaller than the {self.world_size} ranks; the batch size is "
                "global (split across ranks): use --batch-size >= --nproc-per-node x --nnodes"
            )
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise MSFlowError(
                    f"{self.tag}: LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPU(s); "
                    "use --nproc-per-node <= the number of GPUs"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            self.comm_device = device
        if not tdist.is_initialized():
            try:
                timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
            except ValueError as err:
                raise MSFlowError(f"{TIMEOUT_ENV} must be a number of seconds: {err}") from err
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend, timeout=timedelta(seconds=timeout))
            self._owns_group = True
        self._wait_group = tdist.new_group(backend="gloo", timeout=FINAL_WAIT)
        if tdist.get_world_size() != self.world_size or tdist.get_rank() != self.rank:
            raise MSFlowError(f"{self.tag}: the process group does not match RANK/WORLD_SIZE")
        return device

    def __enter__(self) -> Distributed:
        if self.enabled:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.enabled:
            return
        self._failing = err is not None
        # After a failure torchrun SIGTERMs the survivors: let this one finish printing its own message.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if self._failing else self._previous_sigterm)
        if self._owns_group and tdist.is_initialized():
            if err is None:
                tdist.destroy_process_group()
            # after a failure, peers may be gone: leave the group to the process exit, never block on it
        if isinstance(err, MSFlowError):
            if not str(err).startswith("rank "):
                raise type(err)(f"{self.tag}: {err}") from None
            return
        if isinstance(err, RuntimeError) and _is_communication_error(err):
            first = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip()).split(". ")[0][:160]  # drop "[file:line]"
            raise DistributedError(
                f"{self.tag}: lost contact with the other ranks ({first or type(err).__name__}); another "
                "rank probably failed (see its message); continue with --resume"
            ) from None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._failing:
            return  # already ending with our own message
        self._failing = True
        raise DistributedError(
            f"{self.tag}: stopped by the launcher because another rank failed; continue with --resume"
        )

    # -- collectives ----------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def result_from_main(self, result: dict) -> dict:
        """Every rank gets rank 0's ``result``, waiting (long timeout) for as long as rank 0 takes."""
        if not self.enabled or self._wait_group is None:
            return result
        box = [result if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, group=self._wait_group)
        return box[0]

    def all_sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks (identical on every rank); the inputs are left untouched."""
        if not self.enabled:
            return tensors
        out = []
        for t in tensors:
            buf = t.detach().to(self.comm_device, copy=True)
            tdist.all_reduce(buf)
            out.append(buf.to(t.device))
        return out

    def gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` (any first-dimension size, same trailing shape) in rank order."""
        if not self.enabled:
            return t
        size = torch.tensor([t.shape[0]], device=self.comm_device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        tdist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=self.comm_device)
        padded[: t.shape[0]] = t.to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]).to(t.device)

    def merge_to_main(self, acc: M) -> tuple[M, list[int]] | None:
        """Merge every rank's accumulator (test metrics or threshold calibration, each fed this rank's
        shard, see :meth:`shard`) on rank 0: the histograms are all-reduced in their own dtypes (int64
        counts: exact; float64 weights), the per-image state (scores, labels, defect types) gathered and
        appended in rank (= image) order. Rank 0 gets (merged accumulator, images per rank), the
        others ``None``."""
        if not self.enabled:
            return acc, [len(acc.scores)]
        totals = self.all_sum([torch.from_numpy(h) for h in acc.histograms()])
        parts: list[dict | None] | None = [None] * self.world_size if self.is_main else None
        tdist.gather_object(acc.image_state(), parts, dst=0)
        if not self.is_main or parts is None:
            return None
        merged = acc.empty_copy()
        merged.add_histograms([t.numpy() for t in totals])
        for part in parts:
            assert part is not None
            merged.add_image_state(part)
        return merged, [len(p["scores"]) for p in parts if p is not None]

    # -- sharding -------------------------------------------------------------------------------------
    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)`` (the parts tile it in rank order)."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def share_shards(self, arrays: list[np.ndarray]) -> None:
        """Fill every rank's per-scale arrays (N, ...) with the rows each rank computed for its shard."""
        if not self.enabled:
            return
        n = len(arrays[0])
        for src in range(self.world_size):
            rows = Distributed(src, self.world_size).shard(n)
            for start in range(rows.start, rows.stop, _SHARE_ROWS):
                stop = min(start + _SHARE_ROWS, rows.stop)
                for a in arrays:
                    if src == self.rank:
                        buf = torch.from_numpy(np.ascontiguousarray(a[start:stop])).to(self.comm_device)
                    else:
                        buf = torch.empty((stop - start, *a.shape[1:]), device=self.comm_device)
                    tdist.broadcast(buf, src=src)
                    if src != self.rank:
                        a[start:stop] = buf.cpu().numpy()

    def split_batch(self, indices: Tensor) -> Tensor:
        """This rank's part of a global batch (the parts differ in size by at most one)."""
        return indices.tensor_split(self.world_size)[self.rank] if self.enabled else indices

    # -- training -------------------------------------------------------------------------------------
    def wrap_flows(self, model: MSFlow) -> Callable[[list[Tensor]], FlowOutput]:
        """The forward of the flows: DistributedDataParallel over them, or plain ``model.flow``."""
        if not self.enabled:
            return model.flow
        ids = [self.comm_device.index] if self.comm_device.type == "cuda" else None
        # Buffers (permutations, standardisation) are identical on all ranks: no per-step broadcast.
        ddp = nn.parallel.DistributedDataParallel
        no_sync = (
            {"forward_sync_buffers": False}  # newer torch's name; older ones know only broadcast_buffers
            if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
            else {"broadcast_buffers": False}
        )
        return ddp(_Flows(model), device_ids=ids, **no_sync)

    def batch_loss(self, losses: Tensor, global_batch: int) -> Tensor:
        """The loss to back-propagate: the global-batch mean once DDP has averaged over ranks."""
        if not self.enabled:
            return losses.mean()
        return losses.sum() * (self.world_size / global_batch)

    def batch_sum(self, losses: Tensor) -> Tensor:
        """Sum of the per-image losses of the whole global batch, the same on every rank."""
        total = losses.detach().sum()
        if not self.enabled:
            return total
        return self.all_sum([total.to(self.comm_device, torch.float64)])[0]  # no float64 on MPS: not here

    def end_of_epoch(self, epoch: int) -> None:
        """Called by every rank after rank 0 wrote the epoch's checkpoint."""
        self.barrier()
        seam = os.environ.get(KILL_SEAM_ENV)
        if seam and self.enabled and seam == f"{self.rank}:{epoch}":
            print(f"{self.tag}: test seam {KILL_SEAM_ENV}={seam}: SIGKILL", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def report_to_launcher(message: str) -> None:
    """Under torchrun, hand a rank's one-line error to the launcher, whose failure summary shows it
    (instead of "To enable traceback see ..."). torchrun names the file in TORCHELASTIC_ERROR_FILE."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"message": message, "timestamp": int(time.time())}, fh)
        except OSError:
            pass  # the message is on stderr anyway


def _is_communication_error(err: RuntimeError) -> bool:
    """A failed collective: gloo/NCCL/c10d errors (torch raises them as plain RuntimeError, too)."""
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(key in text for key in ("gloo", "nccl", "c10d", "connection", "timed out", "timeout"))
