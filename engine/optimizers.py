"""kohya's optimizer names and ``--optimizer_args`` -> a built optimizer, as sd-scripts' get_optimizer does.

Names are matched case-insensitively (kohya lower-cases them); anything else is a torch.optim class
name or a dotted ``module.Class`` path to a ``torch.optim.Optimizer`` subclass. Each ``key=value`` of
``--optimizer_args`` is split at ``=`` and its value read with ``ast.literal_eval`` (``betas=0.9,0.99``
is a tuple, ``decouple=True`` a bool). This module imports no torch at import time.
"""

from __future__ import annotations

import ast
import importlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from engine.errors import ConfigError

# lower-case kohya name -> (display name, module, class, family)
_KOHYA: dict[str, tuple[str, str, str, str]] = {n.lower(): (n, m, c, fam) for n, m, c, fam in (
    ("AdamW", "torch.optim", "AdamW", ""),
    ("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bnb"),
    ("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bnb"),
    ("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bnb"),
    ("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bnb"),
    ("Lion", "lion_pytorch", "Lion", ""),
    ("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bnb"),
    ("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bnb"),
    ("SGDNesterov", "torch.optim", "SGD", "nesterov"),
    ("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", "bnb-nesterov"),
    ("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadapt"),
    ("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadapt"),
    ("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadapt"),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadapt"),
    ("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadapt"),
    ("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadapt"),
    ("DAdaptLion", "dadaptation", "DAdaptLion", "dadapt"),
    ("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadapt"),
    ("Prodigy", "prodigyopt", "Prodigy", "dadapt"),
    ("Adafactor", "transformers.optimization", "Adafactor", "adafactor"),
    ("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
    ("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
    ("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
)}
KNOWN_OPTIMIZERS: tuple[str, ...] = tuple(v[0] for v in _KOHYA.values())
# torch.optim's optimizers, which kohya takes by bare class name (tests check this against torch).
TORCH_OPTIMIZERS = ("ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam",
                    "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam")
# These raise on their first step when the groups' learning rates differ (other than 0).
_SAME_LR_ONLY = {"dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion", "dadaptsgd", "prodigy"}
_PIP = {"bitsandbytes": "bitsandbytes==0.50.2", "lion_pytorch": "lion-pytorch==0.2.5", "prodigyopt": "prodigyopt==1.1.2",
        "dadaptation": "dadaptation==3.2", "schedulefree": "schedulefree==1.4.1"}


# torch.optim classes kohya would take by name that cannot run its training loop (a step without a closure,
# dense gradients): refused before the run instead of failing at the first step.
_CANNOT_TRAIN = {"SparseAdam": "it needs sparse gradients and a LoRA's gradients are dense",
                 "LBFGS": "its step needs a closure that re-runs the model, and kohya's training loop passes none",
                 "Muon": "it takes only 2-D weights and an SD1.x LoRA has 4-D ones (the 1x1 convs' lora_down/up)"}


def optimizer_type_problem(name: str) -> str | None:
    """Why ``--optimizer_type`` cannot name an optimizer, without importing anything (None when it can)."""
    short = name.removeprefix("torch.optim.")
    if short in _CANNOT_TRAIN:
        return (f"{name!r} cannot train a LoRA: {_CANNOT_TRAIN[short]}; use --optimizer_type=AdamW (or another "
                "one of `spyke-cockpit train --help`)")
    if not name or name.lower() in _KOHYA or name in TORCH_OPTIMIZERS:
        return None
    parts = name.split(".")
    if len(parts) >= 2 and all(p.isidentifier() for p in parts):
        return None  # a dotted path: resolved when the run starts
    return (f"{name!r} is not an optimizer spyke-cockpit knows; use one of {', '.join(KNOWN_OPTIMIZERS)}, "
            "a torch.optim class name, or a dotted path module.Class to a torch.optim.Optimizer subclass")


def resolve_type(optimizer_type: str, use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> str:
    """kohya's choice of optimizer from --optimizer_type and its two legacy switches."""
    name = optimizer_type or "AdamW"
    if use_8bit_adam or use_lion_optimizer:
        legacy, flag = ("AdamW8bit", "--use_8bit_adam") if use_8bit_adam else ("Lion", "--use_lion_optimizer")
        if use_8bit_adam and use_lion_optimizer:
            raise ConfigError("--use_8bit_adam cannot be combined with --use_lion_optimizer; keep one")
        if name.lower() not in ("adamw", legacy.lower()):
            raise ConfigError(f"{flag} cannot be combined with --optimizer_type={optimizer_type}; "
                              f"drop {flag} or set --optimizer_type={legacy}")
        name = legacy
    return name


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """kohya's ``key=value`` list: each value is a Python literal (``0.01``, ``True``, ``0.9,0.99``)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        try:
            if not sep or "=" in value or not key.isidentifier():
                raise ValueError
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ConfigError(f"{flag}: {item!r} is not key=value with a Python literal value "
                              "(e.g. weight_decay=0.01 betas=0.9,0.99 decouple=True, strings in quotes)") from None
    return out


def mps_replacement(kohya_name: str, device_type: str) -> str | None:
    """bitsandbytes has no MPS kernels: the optimizer to use there instead (None when no change is needed)."""
    family = _KOHYA.get(kohya_name.lower(), ("", "", "", ""))[3]
    if device_type == "mps" and family.startswith("bnb"):
        return "SGDNesterov" if family == "bnb-nesterov" else "Lion" if "lion" in kohya_name.lower() else "AdamW"
    return None


@dataclass
class BuiltOptimizer:
    optimizer: Any
    name: str                                 # kohya's ss_optimizer value: module.Class(key=value,...)
    schedule_free: bool = False
    adafactor_initial_lr: float | None = None  # relative_step Adafactor: the LR schedule is AdafactorSchedule
    messages: list[tuple[str, str]] = field(default_factory=list)  # (level, text) to log


def _import(module: str, cls: str, flag_value: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        root = module.split(".")[0]
        hint = f"install it (pip install {_PIP[root]})" if root in _PIP else f"check the module path ({err})"
        raise ConfigError(f"--optimizer_type={flag_value}: cannot import {module}; {hint}, or use "
                          "--optimizer_type=AdamW") from None
    try:
        return getattr(mod, cls)
    except AttributeError:
        raise ConfigError(f"--optimizer_type={flag_value}: {module} has no {cls}; use one of "
                          f"{', '.join(KNOWN_OPTIMIZERS)} or a dotted path module.Class") from None


def _quiet_bitsandbytes() -> None:
    """Its CPU backend logs an unrelated 4-bit kernel note at import, and paged optimizers warn off CUDA
    (said once, in our own words, by build_optimizer)."""
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def build_optimizer(cfg, groups: list[dict], device_type: str) -> BuiltOptimizer:
    """The optimizer kohya's get_optimizer builds for ``cfg`` over ``groups`` (which may be edited, as kohya does)."""
    import torch

    flag_value = resolve_type(cfg.optimizer_type, getattr(cfg, "use_8bit_adam", False),
                              getattr(cfg, "use_lion_optimizer", False))
    kwargs = parse_key_values(cfg.optimizer_args, "--optimizer_args")
    messages: list[tuple[str, str]] = []
    lower = flag_value.lower()
    if (instead := mps_replacement(flag_value, device_type)) is not None:
        messages.append(("warning", f"--optimizer_type={flag_value}: bitsandbytes has no MPS kernels; "
                                    f"training with {instead} instead"))
        lower = instead.lower()
    lr: float | None = cfg.learning_rate
    adafactor_lr = None
    if lower in _KOHYA:
        _, module, cls_name, family = _KOHYA[lower]
        if family.startswith("bnb"):
            _quiet_bitsandbytes()
            if cls_name.startswith("Paged") and device_type != "cuda":
                messages.append(("info", f"{flag_value}: bitsandbytes pages optimizer state only on CUDA; on "
                                         f"{device_type} it runs unpaged (the same updates)"))
        cls = _import(module, cls_name, flag_value)
    else:
        family = ""
        module, _, cls_name = flag_value.rpartition(".")
        cls = _import(module or "torch.optim", cls_name, flag_value)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"--optimizer_type={flag_value}: not a torch.optim.Optimizer subclass")
    if family.endswith("nesterov"):
        if "momentum" not in kwargs:
            messages.append(("info", f"{flag_value} needs momentum; using momentum=0.9 (kohya's default)"))
            kwargs["momentum"] = 0.9
    elif family == "dadapt":
        lrs = [g.get("lr", lr) for g in groups]
        if lrs[0] <= 0.1:
            messages.append(("warning", f"learning rate {lrs[0]:g} is low for D-Adaptation/Prodigy, which expect "
                                        "about 1.0 (it multiplies the step size they find)"))
        if len(set(lrs)) > 1:
            if lower in _SAME_LR_ONLY and len(set(lrs) - {0.0}) > 1:
                raise ConfigError(f"--optimizer_type={flag_value} needs the same learning rate for the U-Net and "
                                  f"text encoder (got {', '.join(f'{x:g}' for x in lrs)}); set --unet_lr and "
                                  "--text_encoder_lr equal (0 freezes one)")
            messages.append(("warning", f"{flag_value} with several learning rates: only the first "
                                        f"({lrs[0]:g}) sets the adapted step size"))
    elif family == "adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            messages.append(("info", "Adafactor: relative_step=True because warmup_init=True"))
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if lr:
                messages.append(("info", f"Adafactor relative_step: --learning_rate={lr:g} is only the "
                                         "initial LR shown before the first step"))
            if any(g.pop("lr", None) is not None for g in groups) and (cfg.unet_lr is not None
                                                                       or cfg.text_encoder_lr is not None):
                messages.append(("warning", "Adafactor relative_step: --unet_lr and --text_encoder_lr are ignored"))
            if cfg.lr_scheduler != "adafactor":
                messages.append(("info", f"Adafactor relative_step: using the adafactor LR scheduler instead of "
                                         f"--lr_scheduler={cfg.lr_scheduler}"))
            adafactor_lr, lr = float(cfg.learning_rate or 0.0), None
        else:
            if cfg.max_grad_norm:
                messages.append(("info", "Adafactor: --max_grad_norm clips gradients; kohya suggests 0"))
            if cfg.lr_scheduler != "constant_with_warmup":
                messages.append(("info", "Adafactor: kohya suggests --lr_scheduler=constant_with_warmup"))
    try:
        extra = {"nesterov": True} if family.endswith("nesterov") else {}
        optimizer = cls(groups, lr=lr, **extra, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--optimizer_args: {flag_value} refused {kwargs} "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    schedule_free = family == "schedulefree"
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()  # schedule-free optimizers start in eval mode
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    name = f"{cls.__module__}.{cls.__name__}" + (f"({args_text})" if args_text else "")
    return BuiltOptimizer(optimizer, name, schedule_free, adafactor_lr, messages)


def _is_train_mode_schedule_free(optimizer) -> bool:
    groups = getattr(optimizer, "param_groups", None) or [{}]
    return callable(getattr(optimizer, "eval", None)) and groups[0].get("train_mode") is True


@contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """Inside: a schedule-free optimizer's parameters are its evaluation weights (what a checkpoint holds).

    On the way out the training weights are put back bit for bit (not recomputed), so a save does not
    perturb the run and a resumed run matches a straight one exactly. No-op for other optimizers.
    """
    if not _is_train_mode_schedule_free(optimizer):
        yield
        return
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def ensure_train_mode(optimizer) -> None:
    """After loading a state: a schedule-free optimizer back in train mode (no-op otherwise)."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    if callable(getattr(optimizer, "train", None)) and groups[0].get("train_mode") is False:
        optimizer.train()
