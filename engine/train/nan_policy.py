"""What a non-finite loss or gradient does (``--nan_policy``): stop before it reaches the weights,
skip the update, or roll back to the last saved state (an in-memory snapshot) at half the learning rate."""

from __future__ import annotations

from typing import Callable

from engine.config import TrainConfig
from engine.errors import SpykeError
from engine.events import Event, LogMessage
from engine.optimizers import ensure_train_mode
from engine.train.progress import StepCounters

ROLLBACK_LIMIT = 5
NAN_SKIP_LIMIT = 5


class NonFiniteLoss(SpykeError):
    pass


def grad_norm(cfg: TrainConfig, params: list, accelerator):
    """Clip the gradients (``--max_grad_norm``) and return their norm as a tensor, unread (no host sync);
    None under fp16, whose grad scaler skips inf/NaN updates itself."""
    import torch

    norm = None
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        if cfg.mixed_precision == "fp16":   # unscales through the grad scaler first
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
    if cfg.mixed_precision == "fp16":
        return None
    if norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.tensor(0.0)
    return norm


def grads_finite(cfg: TrainConfig, params: list, accelerator) -> bool:
    """Clip the gradients (``--max_grad_norm``) and say whether their norm is finite."""
    import torch

    norm = grad_norm(cfg, params, accelerator)
    return True if norm is None else bool(torch.isfinite(norm))


def copy_snapshot(resumable: dict) -> dict:
    """An in-memory copy of the resumable state (lora, optimizer, scheduler, rng, progress)."""
    import copy

    return {
        "lora": {k: v.clone() for k, v in resumable["lora"].items()},
        "optimizer": copy.deepcopy(resumable["optimizer"]),
        "scheduler": copy.deepcopy(resumable["scheduler"]),
        "rng": copy.deepcopy(resumable["rng"]),
        "progress": resumable["progress"],
    }


class NanPolicy:
    """The policy's counters, the learning-rate scale it applies and the snapshot it rolls back to."""

    def __init__(self, cfg: TrainConfig, counters: StepCounters, emit: Callable[[Event], None], *, network,
                 params: list, optimizer, lr_scheduler, forget_state: Callable[[], None]) -> None:
        self.cfg = cfg
        self.counters = counters
        self.emit = emit
        self.network, self.params = network, params
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.forget_state = forget_state
        self.lr_scale = 1.0
        self.nan_skipped = 0
        self.nan_in_row = 0
        self.rollbacks = 0
        self.snapshot: dict | None = None

    def remember(self, resumable: dict) -> None:
        """Keep ``resumable`` (the state just saved or resumed) as the rollback target."""
        self.snapshot = copy_snapshot(resumable)

    def finite_step(self) -> None:
        self.nan_in_row = 0

    def on_nonfinite(self, step: int, what: str) -> str:
        """Apply the NaN policy. Returns 'skip', 'rollback' or raises NonFiniteLoss (stop)."""
        policy = self.cfg.nan_policy
        last = self.counters.last_checkpoint
        hint = self.counters.resume_hint()
        msg = f"non-finite {what} at step {step}"
        if policy == "skip":
            self.nan_skipped += 1
            self.nan_in_row += 1
            self.emit(LogMessage(level="warning", message=f"{msg}: update skipped "
                                 f"({self.nan_in_row} in a row, {self.nan_skipped} in all)"))
            if self.nan_in_row >= NAN_SKIP_LIMIT:
                raise NonFiniteLoss(f"{msg}: {NAN_SKIP_LIMIT} skipped steps in a row, stopping; last good "
                                    f"checkpoint: {last or 'none'}")
            return "skip"
        if policy == "rollback":
            self.rollbacks += 1
            if self.rollbacks > ROLLBACK_LIMIT:
                raise NonFiniteLoss(f"{msg}: still non-finite after {ROLLBACK_LIMIT} rollbacks, stopping; last "
                                    f"good checkpoint: {last or 'none'}")
            back_to = self.snapshot["progress"].global_step
            self.rollback()
            self.emit(LogMessage(level="warning", message=f"{msg}: rolled back to step {back_to}, learning "
                                 f"rate now x{self.lr_scale:g}"))
            return "rollback"
        raise NonFiniteLoss(f"{msg}; stopped before it reached the weights. Last good checkpoint: "
                            f"{last or 'none'}" + (f"; resume with: {hint}" if hint else ""))

    def rollback(self) -> None:
        snap = self.snapshot
        self.network.load_state_tensors(snap["lora"], source="the last saved state")
        for p in self.params:
            p.data = p.data.to(self.network.param_dtype)
        self.optimizer.load_state_dict(snap["optimizer"])
        ensure_train_mode(self.optimizer)
        self.lr_scheduler.load_state_dict(snap["scheduler"])
        # The RNGs are not rewound: the same weights with the same noise would hit the same NaN again.
        self.forget_state()  # the learning rate changed: a state saved now differs from the last one
        self.counters.rewind(snap["progress"])
        self.lr_scale *= 0.5
        sched = self.lr_scheduler.scheduler if hasattr(self.lr_scheduler, "scheduler") else self.lr_scheduler
        sched.base_lrs = [b * self.lr_scale for b in sched.base_lrs]
        for group, base_lr in zip(self.optimizer.param_groups, sched.base_lrs):
            group["initial_lr"] = base_lr
        sched.last_epoch -= 1
        sched.step()
