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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from msflow.config import TrainConfig
from msflow.errors import StoppedError, TrainingError
from msflow.logs import Progress, duration, log
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.distributed import Distributed
from msflow.train.features import FeatureCache
from msflow.train.schedule import Plateau, lr_factor, total_epochs


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The flows' optimizer: Adam (no weight decay, as official) with torch's multi-tensor (foreach) kernels.

    They update all parameters with a few batched ops instead of a dozen element-wise ops per tensor:
    on the 2-core CPU foreach Adam made an EfficientNet-Lite0 training step ~12-20 % faster than the
    per-tensor loop (``benchmarks/train_profile.py``), with Adam's arithmetic. torch's fused kernel was
    as fast but a run resumed from a checkpoint then drifted from the uninterrupted one (the global
    references differed beyond 1e-5 in tests/test_distributed.py), so it is not used.
    """
    return torch.optim.Adam(params, lr=lr, foreach=True)


class FlowAverage:
    """An exponential moving average of the flows' weights (``--ema DECAY``), kept by torch's
    :class:`~torch.optim.swa_utils.AveragedModel`: after each optimizer step ``avg = d * avg + (1 - d) * w``
    (the first step copies ``w``). Only parameters are averaged; the buffers (permutations, positional
    encodings) never change in training. Under torchrun every rank holds the same weights after a step,
    so every rank's average is the same too; an AMP step the scaler skipped is averaged in unchanged.
    """

    def __init__(self, model: MSFlow, decay: float) -> None:
        self.live = torch.nn.ModuleList([model.parallel_flows, model.fusion_flow])  # shares the weights
        self.averaged = AveragedModel(self.live, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def update(self) -> None:
        self.averaged.update_parameters(self.live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averaged weights into the model: what is chosen, calibrated, saved and tested."""
        for live, avg in zip(self.live.parameters(), self.averaged.module.parameters(), strict=True):
            live.copy_(avg)


def make_average(model: MSFlow, cfg: TrainConfig) -> FlowAverage | None:
    """The weight average ``cfg.ema`` asks for, or None (0: the official plain last weights)."""
    return FlowAverage(model, cfg.ema) if cfg.ema > 0 else None


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
    average: FlowAverage | None = None,
) -> TrainState:
    """Train the flows from cached features for epochs ``state.epoch`` to the end of the schedule.

    Arguments:
        on_epoch_end: called after every epoch (checkpointing, optional evaluation).
        step_hook: ``(epoch, step, feats) -> feats``, a seam for fault-injection tests.
        dist: data-parallel training (torchrun): each global batch is split across ranks and the
            gradients averaged by DDP, so the steps are those of one process (see ``distributed.py``).
        holdout: features of the good images held out from training; with ``stop="plateau"`` their
            NLL after each epoch decides the schedule's length (without them, the training loss does).
        on_stop: on SIGTERM, called (every rank, same step) with the state after the current step,
            to write a checkpoint; then :class:`StoppedError` ends the run.
        average: updated after every optimizer step (``make_average``); the caller decides when its
            weights replace the model's.
    """
    dist = dist or Distributed()
    step = _Step(model, optimizer, cfg, device, dist, average)
    good = _snapshot(model, optimizer, average)
    with dist.stopping_at_safe_points():
        while state.epoch < total_epochs(cfg, state.plateau):
            entry = _run_epoch(step, cache, state, step_hook, progress, on_stop)
            if isinstance(entry, str):  # redo this epoch from the last good state, lower learning rate
                _bad_event(model, optimizer, average, good, state, cfg, entry)
                continue
            if cfg.stop == "plateau":
                entry.update(
                    _plateau_step(model, holdout, entry["loss"], state.epoch + 1, cfg, state, device)
                )
            entry["seconds"] = time.perf_counter() - entry.pop("started")
            state.history.append(entry)
            state.epoch += 1
            if progress:
                _log_epoch(entry, len(cache), total_epochs(cfg, state.plateau), state.history)
            good = _snapshot(model, optimizer, average)
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


class _Step:
    """One optimisation step on a (shard of a) global batch: forward, loss, backward, clip, update."""

    def __init__(
        self,
        model: MSFlow,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
        dist: Distributed,
        average: FlowAverage | None = None,
    ) -> None:
        self.model, self.optimizer, self.cfg, self.device, self.dist = model, optimizer, cfg, device, dist
        self.average = average
        self.flow = dist.wrap_flows(model)
        self.use_amp = cfg.amp and device.type == "cuda"  # float16 + loss scaling
        self.use_bf16 = cfg.cpu_bf16 and device.type == "cpu"  # bfloat16 needs no loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.params = model.trainable_parameters()

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
        if self.average is not None:
            self.average.update()
        return batch_sum.item(), stop


def _run_epoch(
    step: _Step,
    cache: FeatureCache,
    state: TrainState,
    step_hook: StepHook | None,
    progress: bool,
    on_stop: Callable[[TrainState], None] | None,
) -> dict | str:
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
                   unit="batches", enabled=progress, summary=False)  # fmt: skip
    for i, idx in enumerate(bar, start=done["step"]):
        step.dist.fire_test_seam(epoch, i)
        feats = [f.to(step.device, non_blocking=True) for f in cache.batch(step.dist.split_batch(idx))]
        if step_hook is not None:
            feats = step_hook(epoch, i, feats)
        outcome = step(feats, len(idx))
        if isinstance(outcome, str):
            return f"{outcome} at epoch {epoch + 1}, step {i}"
        total, count = total + outcome[0], count + len(idx)
        bar.set_postfix(loss=f"{total / count:.4g}", img_s=f"{count / (time.perf_counter() - start):.1f}")
        if outcome[1]:
            state.in_epoch = {
                "step": i + 1,
                "loss_sum": total,
                "images": count,
                "seconds": time.perf_counter() - start,
            }
            if on_stop is not None:
                on_stop(state)
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


def _plateau_step(
    model: MSFlow,
    holdout: FeatureCache | None,
    train_loss: float,
    epoch: int,
    cfg: TrainConfig,
    state: TrainState,
    device: torch.device,
) -> dict:
    """Measure the held-out NLL after ``epoch`` and feed the plateau rule (which reads the values of every
    epoch so far, kept in the history: a resumed run decides the same); the log entry's fields."""
    if holdout is not None and len(holdout):
        value, key = holdout_nll(model, holdout, device), "holdout_nll"
    else:  # no held-out images: the training loss per dimension stands in (it cannot show overfitting)
        value, key = train_loss / sum(c * h * w for c, h, w in model.feature_shapes), "train_nll_per_dim"
    fields: dict = {key: value}
    values = [e[key] for e in state.history if key in e] + [value]  # this epoch is not in the history yet
    if state.plateau.update(values, cfg):
        fields["plateau_at"] = epoch
        fields["schedule_epochs"] = total_epochs(cfg, state.plateau)
    return fields


def _snapshot(
    model: MSFlow, optimizer: torch.optim.Optimizer, average: FlowAverage | None
) -> tuple[dict, dict, dict | None]:
    trainable = {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")
    }
    kept = average.state_dict() if average is not None else None
    return trainable, copy.deepcopy(optimizer.state_dict()), kept


def _bad_event(
    model: MSFlow,
    optimizer: torch.optim.Optimizer,
    average: FlowAverage | None,
    good: tuple[dict, dict, dict | None],
    state: TrainState,
    cfg: TrainConfig,
    what: str,
) -> None:
    """Restore the last good state and halve the learning rate; give up after ``max_bad_steps``."""
    state.bad_events += 1
    if state.bad_events > cfg.max_bad_steps:
        raise TrainingError(f"{what}: {state.bad_events} non-finite events, giving up (lower --lr?)")
    model.load_state_dict(good[0], strict=False)
    optimizer.load_state_dict(good[1])
    if average is not None:  # the bad epoch's steps leave the average too
        average.load_state_dict(good[2])
    state.lr_scale *= 0.5
    log.warning(f"{what}; restored the last good state, learning rate x{state.lr_scale:g}")
