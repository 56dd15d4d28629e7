"""The training loop of the flows, from cached features.

The backbone is frozen and there is no augmentation, so each training image's features are extracted
once into a :class:`~msflow.features.FeatureCache` and the flows train from it; the official code ran
(and back-propagated through) the backbone at every step (docs/official-code-differences.md, B8).
The schedule (``msflow.train.schedule``) is a pure function of the epoch and the plateau state, both
saved in checkpoints, so ``--resume`` lands exactly where it left off (B7). Non-finite losses roll back
to the last good state and lower the learning rate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from msflow.config import TrainConfig
from msflow.errors import StoppedError, TrainingError
from msflow.logs import Progress, duration, log
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.distributed import Distributed
from msflow.train.features import FeatureCache
from msflow.train.schedule import Plateau, lr_factor, total_epochs


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The flows' optimizer: Adam (no weight decay, as official) with torch's multi-tensor (foreach) kernels:
    ~12-20 % faster training steps on the 2-core CPU than per-tensor Adam (docs/results.md, "Training
    speed of the default model").
    The fused kernel was as fast, but a resumed run drifted from the uninterrupted one (beyond 1e-5 in
    tests/test_distributed.py)."""
    return torch.optim.Adam(params, lr=lr, foreach=True)


@dataclass
class TrainState:
    """What a resumed run needs besides the weights: where it is and what happened so far."""

    epoch: int = 0  # epochs completed
    lr_scale: float = 1.0  # lowered after each non-finite event
    bad_events: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per epoch: loss, lr, seconds
    plateau: Plateau = field(default_factory=Plateau)  # the plateau rule's state (stop="plateau")
    # Stopped (SIGTERM) inside epoch ``epoch + 1``: {"step": steps done, "loss_sum", "images", "seconds"}.
    in_epoch: dict | None = None


RESUME_HINT = "continue with --resume (torchrun restarts and Slurm requeues continue on their own)"
StepHook = Callable[[int, int, list[torch.Tensor]], list[torch.Tensor]]


def train_flows(
    model: MSFlow,
    cache: FeatureCache,
    cfg: TrainConfig,
    device: torch.device,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    step_hook: StepHook | None = None,
    progress: bool = True,
    dist: Distributed | None = None,
    holdout: FeatureCache | None = None,
    on_stop: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train the flows from cached features for epochs ``state.epoch`` to the end of the schedule.

    ``on_epoch_end`` checkpoints (and may evaluate); ``step_hook(epoch, step, feats) -> feats`` is a seam
    for fault-injection tests; ``dist`` splits each global batch across ranks (DDP averages gradients);
    with ``stop="plateau"``, the ``holdout`` features' NLL after each epoch (else the training loss)
    decides the schedule's length; on SIGTERM ``on_stop`` gets the state after the current step (every
    rank, same step) to write a checkpoint, then :class:`StoppedError` ends the run.
    """
    dist = dist or Distributed()
    step = _Step(model, optimizer, cfg, device, dist, step_hook, on_stop, progress)
    good = step.snapshot()
    with dist.stopping_at_safe_points():
        while state.epoch < total_epochs(cfg, state.plateau):
            entry = _run_epoch(step, cache, state)
            if isinstance(entry, str):  # redo this epoch from the last good state, lower learning rate
                step.roll_back(good, state, entry)
                continue
            if cfg.stop == "plateau":
                entry.update(_plateau_step(step, holdout, entry["loss"], state))
            entry["seconds"] = time.perf_counter() - entry.pop("started")
            state.history.append(entry)
            state.epoch += 1
            if progress:
                _log_epoch(entry, len(cache), total_epochs(cfg, state.plateau), state.history)
            good = step.snapshot()
            if on_epoch_end is not None:
                on_epoch_end(state)
        if dist.any_stop_requested():  # SIGTERM after the last step: the final checkpoint is written
            raise StoppedError(
                "stopped by SIGTERM after the last epoch, whose checkpoint is written: " + RESUME_HINT
            )
    return state


def _log_epoch(entry: dict, images: int, epochs: int, history: list[dict]) -> None:
    """One line per epoch: loss, speed and the time left at the mean pace of the last epochs."""
    recent = [e["seconds"] for e in history[-5:]]
    left = (epochs - entry["epoch"]) * sum(recent) / len(recent)
    held_out = f", held-out NLL {entry['holdout_nll']:.4g}" if "holdout_nll" in entry else ""
    log.info(
        f"epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4g}{held_out}, "
        f"{images / max(entry['seconds'], 1e-9):.1f} images/s, {duration(left)} left"
    )


@dataclass
class _Step:
    """One optimisation step on a (shard of a) global batch: forward, loss, backward, clip, update; with
    what every epoch's steps share (the tests' seam, the SIGTERM checkpoint, the progress bar)."""

    model: MSFlow
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    dist: Distributed
    hook: StepHook | None = None
    on_stop: Callable[[TrainState], None] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.flow = self.dist.wrap_flows(self.model)
        self.use_amp = self.cfg.amp and self.device.type == "cuda"  # float16 + loss scaling
        self.use_bf16 = self.cfg.cpu_bf16 and self.device.type == "cpu"  # bfloat16 needs no loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.params = self.model.trainable_parameters()

    def snapshot(self) -> tuple[dict, dict]:
        """The flows' weights and the optimizer's state, to roll back to."""
        trainable = self.model.state_dict()
        trainable = {k: v.detach().clone() for k, v in trainable.items() if not k.startswith("backbone.")}
        return trainable, copy.deepcopy(self.optimizer.state_dict())

    def roll_back(self, good: tuple[dict, dict], state: TrainState, what: str) -> None:
        """Restore the last good state and halve the learning rate; give up after ``max_bad_steps``."""
        state.bad_events += 1
        if state.bad_events > self.cfg.max_bad_steps:
            raise TrainingError(f"{what}: {state.bad_events} non-finite events, giving up (lower --lr?)")
        self.model.load_state_dict(good[0], strict=False)
        self.optimizer.load_state_dict(good[1])
        state.lr_scale *= 0.5
        log.warning(f"{what}; restored the last good state, learning rate x{state.lr_scale:g}")

    def __call__(self, feats: list[torch.Tensor], global_batch: int) -> tuple[float, bool] | str:
        """(the global batch's loss sum, whether to stop after it), or what went non-finite."""
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16 if self.use_bf16 else None,
            enabled=self.use_amp or self.use_bf16,
        ):
            out = self.flow(feats)
        # The loss is summed over ~10^5-10^6 dims: compute it in float32 even under AMP.
        losses = nll([z.float() for z in out.zs], out.log_det.float())
        batch_sum, stop = self.dist.step_totals(losses)  # whole global batch: every rank decides the same
        if not torch.isfinite(batch_sum):
            return "non-finite loss"
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.dist.batch_loss(losses, global_batch)).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if not torch.isfinite(grad_norm) and not self.use_amp:  # under AMP the scaler skips the step itself
            return "non-finite gradient"
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return batch_sum.item(), stop


def _run_epoch(step: _Step, cache: FeatureCache, state: TrainState) -> dict | str:
    """Epoch ``state.epoch + 1`` (from where a stopped run left it): its log entry, or what went wrong."""
    cfg, epoch = step.cfg, state.epoch
    lr = cfg.lr * lr_factor(epoch, cfg, state.plateau) * state.lr_scale
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    # A generator per epoch: the order depends only on (seed, epoch), so a resumed run is identical.
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    batches = order.split(cfg.batch_size)
    done = state.in_epoch or {"step": 0, "loss_sum": 0.0, "images": 0, "seconds": 0.0}
    state.in_epoch = None
    total, count, start = done["loss_sum"], done["images"], time.perf_counter() - done["seconds"]
    # A bar within the epoch on a terminal; the epoch's own line (train_flows), wherever the output goes.
    bar = Progress(batches[done["step"] :], f"epoch {epoch + 1}/{total_epochs(cfg, state.plateau)}",
                   unit="batches", enabled=step.progress, summary=False)  # fmt: skip
    for i, idx in enumerate(bar, start=done["step"]):
        step.dist.fire_test_seam(epoch, i)
        feats = [f.to(step.device, non_blocking=True) for f in cache.batch(step.dist.split_batch(idx))]
        if step.hook is not None:
            feats = step.hook(epoch, i, feats)
        outcome = step(feats, len(idx))
        if isinstance(outcome, str):
            return f"{outcome} at epoch {epoch + 1}, step {i}"
        total, count = total + outcome[0], count + len(idx)
        bar.set_postfix(loss=f"{total / count:.4g}", img_s=f"{count / (time.perf_counter() - start):.1f}")
        if outcome[1]:
            seconds = time.perf_counter() - start
            state.in_epoch = {"step": i + 1, "loss_sum": total, "images": count, "seconds": seconds}
            if step.on_stop is not None:
                step.on_stop(state)
            raise StoppedError(
                f"stopped by SIGTERM at epoch {epoch + 1}, step {i + 1} of {len(batches)}; its checkpoint "
                f"is written: {RESUME_HINT}"
            )
    return {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": lr, "started": start}


@torch.no_grad()
def holdout_nll(model: MSFlow, holdout: FeatureCache, device: torch.device, batch_size: int = 32) -> float:
    """Mean negative log-likelihood of the held-out features, in nats per latent dimension."""
    total, dims, count = 0.0, 0, 0
    for feats in holdout.batches(batch_size):
        out = model.flow([f.to(device) for f in feats])
        total += nll([z.float() for z in out.zs], out.log_det.float()).sum().item()
        dims = sum(z[0].numel() for z in out.zs)
        count += len(feats[0])
    return total / (count * dims)


def _plateau_step(step: _Step, holdout: FeatureCache | None, train_loss: float, state: TrainState) -> dict:
    """Measure the held-out NLL after this epoch and feed the plateau rule (which reads the values of every
    epoch so far, kept in the history: a resumed run decides the same); the log entry's fields."""
    model, cfg = step.model, step.cfg
    if holdout is not None and len(holdout):
        value, key = holdout_nll(model, holdout, step.device), "holdout_nll"
    else:  # no held-out images: the training loss per dimension stands in (it cannot show overfitting)
        value, key = train_loss / sum(c * h * w for c, h, w in model.feature_shapes), "train_nll_per_dim"
    fields: dict = {key: value}
    values = [e[key] for e in state.history if key in e] + [value]  # this epoch is not in the history yet
    if state.plateau.update(values, cfg):
        fields["plateau_at"] = state.epoch + 1
        fields["schedule_epochs"] = total_epochs(cfg, state.plateau)
    return fields
