"""Data-parallel training of one model on several processes (torchrun), all in this one file.

torchrun starts N copies of the same command and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without those, :meth:`Distributed.from_environment` is the
single process, whose every method is a no-op, so the training code has one path.

N ranks train the model of one process: each extracts a shard of the features, the standardisation
sums are all-reduced and the shards shared, so every rank draws the same seeded global batches; each
batch is split across ranks and DDP averages gradients scaled to the single-process mean
(:meth:`batch_loss`); every decision reads all-reduced values (:meth:`step_totals`). Rank 0 alone
writes the run folder while the others wait; calibration and the test evaluation are sharded and merged
on rank 0. A lost peer or SIGTERM ends every rank with one line; SIGTERM during training stops every
rank after the same step, with a checkpoint. docs/scaling.md is the user's view.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from msflow.errors import DistributedError, MSFlowError, StoppedError
from msflow.evaluate.streaming import Mergeable
from msflow.model.msflow import FlowOutput, MSFlow

TIMEOUT_ENV = "MSFLOW_DIST_TIMEOUT"  # seconds a collective waits for a missing rank (default below)
DEFAULT_TIMEOUT_S = 1800
# The other ranks wait for rank 0's evaluation (as long as the test set takes) in a separate group;
# a rank 0 that dies still ends the wait at once (its connections close).
FINAL_WAIT = timedelta(hours=24)
# ---- test seam (tests/test_distributed.py, tests/test_restart.py): "RANK:EPOCHS:STEP:SIGNAL" makes that
# rank send itself SIGNAL (KILL or TERM) when EPOCHS epochs are complete, just before step STEP of the
# next one (each epoch's checkpoint precedes its step 0). With KILL_SEAM_ONCE_ENV naming a file, the seam
# fires only where it can create that file (once per job, across torchrun restarts and Ray retries).
# Read only here. ----
KILL_SEAM_ENV = "MSFLOW_TEST_KILL_RANK"
KILL_SEAM_ONCE_ENV = "MSFLOW_TEST_KILL_ONCE"
# How many times the job was restarted: torchrun --max-restarts, or a requeued Slurm job.
RESTART_ENVS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
M = TypeVar("M", bound=Mergeable)
R = TypeVar("R")
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

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, restarts: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.enabled, self.is_main = world_size > 1, rank == 0
        self.tag = f"rank {rank}/{world_size}"  # the prefix of this rank's messages
        self.restarts = restarts  # > 0: this job was restarted (it continues its run folder by itself)
        self.comm_device = torch.device("cpu")  # where collective tensors live (CUDA for nccl)
        self.stop_requested = False  # SIGTERM arrived during training: stop after the current step
        self._owns_group = False
        self._failing = False
        self._at_safe_points = False
        self._previous_sigterm: object = None  # None: no handler of ours installed
        self._wait_group: object = None
        self._seam = _parse_seam(os.environ.get(KILL_SEAM_ENV, ""), rank)

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
        counts = [os.environ.get(k, "").strip() for k in RESTART_ENVS]
        return cls(rank, world, local, max((int(c) for c in counts if c.isdigit()), default=0))

    @property
    def sharding(self) -> Distributed | None:
        """What an evaluation shards its images by: this job, or None in a single process."""
        return self if self.enabled else None

    def main_only(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0, silence on the others (one voice per job)."""
        return log if self.is_main else lambda _: None

    def on_main(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
        """``fn(*args, **kwargs)`` on rank 0 alone (it writes the run folder); None on the others."""
        return fn(*args, **kwargs) if self.is_main else None

    def from_main(self, decide: Callable[[], dict]) -> dict:
        """Rank 0 alone runs ``decide`` (it writes the run folder); every rank gets its result."""
        return self.result_from_main(decide() if self.is_main else {})

    # -- life cycle ----------------------------------------------------------------------------------
    def setup(self, device: torch.device, batch_size: int, budget: float | None = None) -> torch.device:
        """Join the process group (nccl for CUDA, gloo otherwise); returns this rank's device."""
        if not self.enabled:
            return device
        if budget is not None:
            raise MSFlowError(
                "--budget times this process alone; it cannot be used with torchrun (set --epochs)"
            )
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
            wait = timedelta(seconds=timeout)
            tdist.init_process_group(backend, timeout=wait, **self._store_of_this_attempt(wait))
            self._owns_group = True
        self._wait_group = tdist.new_group(backend="gloo", timeout=FINAL_WAIT)
        if tdist.get_world_size() != self.world_size or tdist.get_rank() != self.rank:
            raise MSFlowError(f"{self.tag}: the process group does not match RANK/WORLD_SIZE")
        return device

    def _store_of_this_attempt(self, timeout: timedelta) -> dict:
        """A restarted torchrun job reuses the launcher's store, which still holds the previous attempt's
        keys (the dead ranks' addresses: a rank that reads one fails to connect). Each attempt keeps
        its keys under its own prefix; the first attempt uses the store as it is."""
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip()
        if attempt in ("", "0"):
            return {}
        store, _, _ = next(tdist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
        prefixed = tdist.PrefixStore(f"msflow/attempt_{attempt}", store)
        return {"store": prefixed, "rank": self.rank, "world_size": self.world_size}

    def __enter__(self) -> Distributed:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, _kind: object, err: BaseException | None, _traceback: object) -> None:
        self._failing = err is not None
        if self._previous_sigterm is not None:
            # After a failure torchrun SIGTERMs the survivors: let this one finish printing its own message.
            failing_rank = self._failing and self.enabled
            signal.signal(signal.SIGTERM, signal.SIG_IGN if failing_rank else self._previous_sigterm)  # type: ignore[arg-type]
            self._previous_sigterm = None
        if not self.enabled:
            return
        # After a failure, peers may be gone: leave the group to the process exit, never block on it.
        if self._owns_group and err is None and tdist.is_initialized():
            tdist.destroy_process_group()
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

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        if self._failing:
            return  # already ending with our own message
        if self._at_safe_points and not self.stop_requested:
            self.stop_requested = True  # the training loop stops after this step, with a checkpoint
            return
        self._failing = True
        who = "the launcher (another rank failed?) or the scheduler" if self.enabled else "the system"
        raise StoppedError(
            f"stopped by SIGTERM from {who}; the last checkpoint is kept: continue with --resume"
        )

    @contextmanager
    def stopping_at_safe_points(self) -> Iterator[None]:
        """While inside, SIGTERM only sets :attr:`stop_requested` (the training loop's steps)."""
        self._at_safe_points = True
        try:
            yield
        finally:
            self._at_safe_points = False

    def fire_test_seam(self, epochs_done: int, step: int) -> None:
        """The fault-injection seam of the tests (see KILL_SEAM_ENV); nothing without it."""
        if self._seam is None or self._seam[:2] != (epochs_done, step):
            return
        once = os.environ.get(KILL_SEAM_ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # fired already in an earlier attempt of this job
        print(f"{self.tag}: test seam {KILL_SEAM_ENV}: SIG{self._seam[2]}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, f"SIG{self._seam[2]}"))

    # -- collectives ----------------------------------------------------------------------------------
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
        parts: list = [None] * self.world_size
        tdist.all_gather_object(parts, t.cpu())
        return torch.cat(parts).to(t.device)

    def merge_to_main(self, acc: M) -> tuple[M, list[int]] | None:
        """Merge every rank's accumulator (test metrics or threshold calibration, each fed this rank's
        shard, see :meth:`shard`) on rank 0: the histograms are all-reduced in their own dtypes (int64
        counts: exact; float64 weights), the per-image state (scores, labels, defect types) gathered and
        appended in rank (= image) order. Rank 0 gets (merged accumulator, images per rank), the
        others ``None``."""
        if not self.enabled:
            return acc, [len(acc.scores)]
        totals = self.all_sum([torch.from_numpy(h) for h in acc.histograms()])
        parts: list | None = [None] * self.world_size if self.is_main else None
        tdist.gather_object(acc.image_state(), parts, dst=0)
        if parts is None:  # not rank 0
            return None
        merged = acc.empty_copy()
        merged.add_histograms([t.numpy() for t in totals])
        for part in parts:
            merged.add_image_state(part)
        return merged, [len(p["scores"]) for p in parts]

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
                for a in arrays:  # the receivers' rows are not filled yet: the broadcast overwrites them
                    buf = torch.from_numpy(np.ascontiguousarray(a[start:stop])).to(self.comm_device)
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

    def step_totals(self, losses: Tensor) -> tuple[Tensor, bool]:
        """(sum of the per-image losses of the whole global batch, whether any rank was asked to stop),
        the same on every rank: one all-reduce, so every rank decides alike after every step."""
        total = losses.detach().sum()
        if not self.enabled:
            return total, self.stop_requested
        both = torch.stack(
            [total.to(torch.float64), torch.tensor(float(self.stop_requested), dtype=torch.float64)]
        )
        summed = self.all_sum([both.to(self.comm_device)])[0]  # no float64 on MPS: not here
        return summed[0], bool(summed[1] > 0)

    def any_stop_requested(self) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank)."""
        return self.step_totals(torch.zeros(0))[1]

    def wait_for_main(self) -> None:
        """Every rank waits here until rank 0 has written (a checkpoint, say)."""
        if self.enabled:
            tdist.barrier()


def _parse_seam(value: str, rank: int) -> tuple[int, int, str] | None:
    """This rank's (epochs done, step, signal name) from KILL_SEAM_ENV, or None."""
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != str(rank):
        return None
    return int(parts[1]), int(parts[2]), parts[3].upper()


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
