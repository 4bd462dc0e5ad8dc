"""The learning-rate schedule, with sd-scripts' get_scheduler_fix semantics.

- ``--lr_warmup_steps`` / ``--lr_decay_steps`` below 1 are ratios of the run's total steps
  (``int(ratio * total)``), whole numbers are steps.
- ``--lr_scheduler_args key=value ...`` go to the schedule function (or class) as keyword arguments.
- ``--lr_scheduler_type`` names a torch.optim.lr_scheduler class (or a dotted ``module.Class``) that is
  used instead of ``--lr_scheduler``; like kohya it takes no warm-up.
- A relative-step Adafactor drives its own LR: the schedule is transformers' AdafactorSchedule.
- Schedule-free optimizers keep the LR constant (kohya's dummy scheduler); their warm-up is an optimizer arg.

The six classic schedules come from diffusers (the same formulas transformers has, without its slow
import); the newer ones (inverse_sqrt, cosine_with_min_lr, warmup_stable_decay) from transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.errors import ConfigError
from engine.optimizers import BuiltOptimizer, parse_key_values

CLASSIC = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
           "piecewise_constant")
NEWER = ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
SCHEDULERS = CLASSIC[:6] + ("adafactor",) + NEWER + ("piecewise_constant",)


def steps_from(value: float | int, total_steps: int) -> int:
    """kohya's int_or_float: a value below 1 is a ratio of the total steps, otherwise a step count."""
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def _no_warmup(what: str, warmup: int) -> None:
    if warmup:
        raise ConfigError(f"--lr_warmup_steps: {what} takes no warm-up; set --lr_warmup_steps=0")


def build_scheduler(cfg, built: BuiltOptimizer, total_steps: int) -> tuple[Any, list[tuple[str, str]]]:
    """The LR scheduler for ``built.optimizer`` and (level, text) notes to log."""
    from torch.optim.lr_scheduler import LambdaLR

    optimizer = built.optimizer
    warmup = steps_from(cfg.lr_warmup_steps, total_steps)
    decay = steps_from(cfg.lr_decay_steps, total_steps)
    kwargs = parse_key_values(cfg.lr_scheduler_args, "--lr_scheduler_args")
    notes: list[tuple[str, str]] = []
    if built.schedule_free:
        ignored = [f"--{n}" for n in ("lr_scheduler", "lr_warmup_steps", "lr_scheduler_type")
                   if getattr(cfg, n) not in ("constant", 0, "")]
        if ignored:
            notes.append(("warning", f"{', '.join(ignored)} ignored: a schedule-free optimizer keeps the LR "
                                     "constant (warm up with --optimizer_args warmup_steps=N)"))
        return LambdaLR(optimizer, lambda _: 1.0), notes
    if cfg.lr_scheduler_type:
        return _custom(cfg.lr_scheduler_type, optimizer, kwargs, warmup), notes
    name = cfg.lr_scheduler
    if built.adafactor_initial_lr is not None or name == "adafactor":
        if built.adafactor_initial_lr is None:
            raise ConfigError("--lr_scheduler=adafactor needs --optimizer_type=Adafactor with relative_step=True "
                              "(its default); choose another --lr_scheduler")
        _no_warmup("the adafactor scheduler", warmup)
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, built.adafactor_initial_lr), notes
    try:
        if name in CLASSIC:
            from diffusers.optimization import SchedulerType, TYPE_TO_SCHEDULER_FUNCTION
        else:
            from transformers.optimization import SchedulerType, TYPE_TO_SCHEDULER_FUNCTION
        fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise ConfigError(f"--lr_scheduler={name}: not a schedule; use one of {', '.join(SCHEDULERS)}") from None
    ratio = cfg.lr_scheduler_min_lr_ratio
    by_name: dict[str, dict[str, Any]] = {
        "constant": {}, "piecewise_constant": {},
        "constant_with_warmup": {"num_warmup_steps": warmup},
        "inverse_sqrt": {"num_warmup_steps": warmup, "timescale": cfg.lr_scheduler_timescale},
        "linear": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine_with_restarts": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                                 "num_cycles": cfg.lr_scheduler_num_cycles},
        "polynomial": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                       "power": cfg.lr_scheduler_power},
        "cosine_with_min_lr": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                               "num_cycles": cfg.lr_scheduler_num_cycles / 2, "min_lr_rate": ratio},
        "warmup_stable_decay": {"num_warmup_steps": warmup, "num_stable_steps": total_steps - warmup - decay,
                                "num_decay_steps": decay, "num_cycles": cfg.lr_scheduler_num_cycles / 2,
                                "min_lr_ratio": ratio if ratio is not None else 0.0},
    }
    if name in ("constant", "piecewise_constant"):
        _no_warmup(f"--lr_scheduler={name}", warmup)
    if name == "cosine_with_min_lr" and ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        raise ConfigError("--lr_scheduler=cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    try:
        return fn(optimizer, **{**by_name[name], **kwargs}), notes
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--lr_scheduler_args: --lr_scheduler={name} refused {kwargs} "
                          f"({str(err).splitlines()[0]})") from None


def _custom(path: str, optimizer, kwargs: dict[str, Any], warmup: int):
    import torch

    module, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), cls_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"--lr_scheduler_type={path}: no such scheduler class; give a torch.optim.lr_scheduler "
                          "class name (e.g. CosineAnnealingLR) or a dotted path module.Class") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        raise ConfigError(f"--lr_scheduler_type={path}: not a torch.optim.lr_scheduler.LRScheduler subclass")
    _no_warmup(f"--lr_scheduler_type={path}", warmup)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--lr_scheduler_args: {cls_name} refused {kwargs} ({str(err).splitlines()[0]})") from None
