"""Run the engine on a background thread (for the cockpit and tests)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from engine.config import TrainConfig
from engine.control import TrainingControl
from engine.events import Event, LogMessage
from engine.fit.awake import keep_awake


@dataclass
class TrainingHandle:
    control: TrainingControl
    thread: threading.Thread
    trainer: object = None
    result: object = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def run_dir(self) -> Path | None:
        return getattr(self.trainer, "run_dir", None)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


def start_training(config: TrainConfig, sinks: Iterable[Callable[[Event], None]] = (),
                   control: TrainingControl | None = None, **trainer_kwargs) -> TrainingHandle:
    """Start a run on a daemon thread; ``sinks`` are called on that thread for every event."""
    from engine.trackers import make_trackers, without_secrets
    from engine.trainer import Trainer

    control = control or TrainingControl()
    viewers = list(sinks)

    def say(line: str) -> None:  # the trackers' info lines, to the viewers (the journal is the trainer's)
        for sink in viewers:
            sink(LogMessage(level="info", message=line))

    trackers = make_trackers(config, say=say)
    trainer_kwargs.setdefault("on_disk_full", "pause")  # someone is watching: pause, let them free space
    trainer = Trainer(without_secrets(config), control=control, sinks=viewers + trackers, **trainer_kwargs)
    handle = TrainingHandle(control=control, thread=None, trainer=trainer)  # type: ignore[arg-type]

    def target() -> None:
        try:
            with keep_awake(config.no_prevent_sleep):
                handle.result = trainer.run()
        finally:
            handle._done.set()

    handle.thread = threading.Thread(target=target, name="spyke-engine", daemon=True)
    handle.thread.start()
    return handle
