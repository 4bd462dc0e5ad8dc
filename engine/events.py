"""Typed run events and their JSONL form.

The engine emits these dataclasses; a run folder's ``events.jsonl`` holds one per line
(``{"v": 1, "type": "step", ...}``), written and read by :mod:`engine.run.journal`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, dataclass_transform

SCHEMA_VERSION = 1

PHASES = ("loading", "caching", "training", "saving", "sampling", "validating", "paused", "finished")


EVENT_TYPES: dict[str, type[Event]] = {}      # the JSONL "type" tag -> the event class, filled as classes are made


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
@dataclass(frozen=True)
class Event:
    """An engine event: every subclass is a frozen dataclass, tagged ``class X(Event, type="x")``; the tag is
    the ``type`` key of its JSONL line, and :data:`EVENT_TYPES` finds the class again from it."""

    type: ClassVar[str] = "event"
    t: float = field(default_factory=time.time, kw_only=True)

    def __init_subclass__(cls, type: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if type:
            cls.type = type
        dataclass(frozen=True)(cls)
        EVENT_TYPES[cls.type] = cls

    def to_json(self) -> str:
        return json.dumps({"v": SCHEMA_VERSION, "type": self.type, **asdict(self)}, separators=(",", ":"),
                          default=str)


class RunStarted(Event, type="run_started"):
    run_id: str
    output_dir: str
    output_name: str
    total_steps: int
    num_epochs: int
    batches_per_epoch: int
    device: str
    pid: int
    config: dict[str, Any]
    checkpoint_steps: list[int] = field(default_factory=list)
    start_step: int = 0
    seed: int | None = None


class PhaseChanged(Event, type="phase"):
    phase: str
    detail: str = ""


class StepCompleted(Event, type="step"):
    step: int
    epoch: int
    loss: float
    lrs: dict[str, float]
    step_seconds: float
    skipped: bool = False
    # --scale_weight_norms (kohya's max_norm/keys_scaled, norm/avg_key_norm, max_norm/max_key_norm); None without it
    keys_scaled: int | None = None
    avg_key_norm: float | None = None
    max_key_norm: float | None = None
    # the groups' learning rates once the schedule stepped (the next step's), which kohya's trackers log
    # (lr_scheduler.get_last_lr() after its step); None in journals written before they were recorded
    next_lrs: dict[str, float] | None = None
    # D-Adaptation / Prodigy: each group's d × lr after the step (kohya's lr/d*lr tags); None for other optimizers
    d_lrs: dict[str, float] | None = None

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("keys_scaled", "avg_key_norm", "max_key_norm", "next_lrs", "d_lrs")

    def to_json(self) -> str:
        """As every event, without the optional keys that are None (most runs: shorter step lines)."""
        data = {"v": SCHEMA_VERSION, "type": self.type, **asdict(self)}
        for name in self._OPTIONAL:
            if data[name] is None:
                del data[name]
        return json.dumps(data, separators=(",", ":"), default=str)


class MemorySample(Event, type="memory"):
    device: str
    rss: int
    sys_used: int
    sys_available: int
    sys_total: int
    allocated: int | None = None      # CUDA allocated / MPS current_allocated_memory
    reserved: int | None = None       # CUDA reserved / MPS driver_allocated_memory
    peak: int | None = None           # CUDA max_memory_allocated
    device_total: int | None = None   # CUDA total / MPS recommended_max_memory
    swap_used: int | None = None      # system swap in use (psutil), every platform


class CheckpointSaved(Event, type="checkpoint"):
    path: str
    step: int
    epoch: int
    bytes: int
    kind: str                         # step | epoch | final | manual | abort
    loss: float | None = None
    verified: bool = False
    state_dir: str | None = None


class LogMessage(Event, type="log"):
    level: str                        # info | warning | error
    message: str


class NetworkBuilt(LogMessage, type="network"):
    """The LoRA as built, an info line headless output prints (kohya users read it at start-up)."""

    unet_modules: int = 0
    text_encoder_modules: int = 0
    dim: int = 0
    alpha: float = 0.0

    @classmethod
    def of(cls, unet_modules: int, text_encoder_modules: int, dim: int, alpha: float) -> "NetworkBuilt":
        message = (f"LoRA: {unet_modules} U-Net modules, {text_encoder_modules} text-encoder modules, "
                   f"dim {dim}, alpha {alpha:g}")
        return cls(level="info", message=message, unet_modules=unet_modules,
                   text_encoder_modules=text_encoder_modules, dim=dim, alpha=alpha)


class AttentionKernel(LogMessage, type="attention"):
    """The attention the UNet runs, measured once the model is on its device (``engine.attention_probe``):
    diffusers' processor classes and the aten kernel PyTorch's SDPA dispatched to, per head size, for the
    compute dtype; an info line headless output prints."""

    processors: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    head_dims: list[int] = field(default_factory=list)
    dtype: str = ""
    device: str = ""

    @classmethod
    def of(cls, report) -> "AttentionKernel":
        """From an ``engine.attention_probe.AttentionReport``."""
        return cls(level="info", message=report.line(), processors=list(report.processors),
                   kernels=list(report.kernels), head_dims=list(report.head_dims), dtype=report.dtype,
                   device=report.device)


class CheckpointRemoved(LogMessage, type="checkpoint_removed"):
    """A checkpoint file of this run removed by the ``--save_last_n_*`` pruning (its log line, and the
    path, so a viewer stops offering it)."""

    path: str = ""
    step: int = 0


class SamplesSaved(Event, type="samples"):
    """One batch of sample images made from the model being trained (one entry per prompt).

    ``paths[i]`` is the PNG for ``prompts[i]`` drawn with ``seeds[i]``; a prompt that failed has an
    empty path and its one-line reason in ``errors[i]``. ``checkpoint`` is the file saved at the same
    step, when the samples were made for a checkpoint."""

    step: int
    epoch: int
    paths: list[str]
    prompts: list[str]
    seeds: list[int | None]
    errors: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0


class ValidationLoss(Event, type="validation"):
    """The loss on the held-out images (fixed timesteps and noise per image, so values compare)."""

    step: int
    epoch: int
    loss: float
    images: int
    checkpoint: str | None = None
    kinds: list[str] = field(default_factory=list)   # why: "step" (every n steps), "epoch" (an epoch's end), "checkpoint"
    batches: int = 0


class RunFinished(Event, type="finished"):
    status: str                       # completed | aborted | failed
    step: int
    error: str | None = None
    final_path: str | None = None
    resume_hint: str | None = None
    fits: list[str] = field(default_factory=list)   # out of memory: the kohya flags that would fit, best first




def event_from_dict(data: dict[str, Any]) -> Event | None:
    """Rebuild an event; unknown types and extra keys (newer writers) are tolerated."""
    cls = EVENT_TYPES.get(data.get("type", ""))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError:
        return None


Sink = Callable[[Event], None]


class EventBus:
    """Fan-out of engine events to sinks (the JSONL log, a printer, the cockpit).

    Sinks run on the engine thread and must not block. A sink that raises is dropped
    (with a log event), so a broken viewer never stops a run.
    """

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self._sinks: list[Sink] = list(sinks)

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception as err:  # noqa: BLE001 - a viewer's bug must not kill training
                self._sinks.remove(sink)
                if not isinstance(event, LogMessage):
                    self.emit(LogMessage(level="warning", message=f"event sink {sink!r} removed: {err}"))
