"""Where the cockpit's events come from: the live engine (a viewer's source is cockpit.viewer.tail).

An :class:`EventSource` starts a run and forwards its events to one callback. The callback
may be called on any thread (the engine's) and never blocks. Control commands go the
other way and are thread-safe. The attach command adds a source that tails a run folder's
``events.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from engine.api import Command, Commands, Event, TrainConfig

Deliver = Callable[[Event], None]


@runtime_checkable
class EventSource(Protocol):
    def start(self, config: TrainConfig, deliver: Deliver) -> None:
        """Begin a run; may raise SpykeError. Called from a worker thread (it may import torch)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def save(self) -> None: ...

    def abort(self, save: bool) -> None: ...

    def sample(self) -> None:
        """Make sample images at the next step boundary."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run is over (True) or the timeout passes (False). True when nothing runs."""

    @property
    def running(self) -> bool: ...

    @property
    def run_dir(self) -> Path | None: ...

    @property
    def owns_run(self) -> bool:
        """True when the run lives in this process (closing the app must wait for it or stop it);
        False for a viewer of a run in another process."""

    def outcome(self) -> str | None:
        """How the run ended (completed | aborted | failed), or None while unknown."""


class LiveSource(Commands):
    """Runs the engine in this process on its own daemon thread (engine.session.start_training)."""

    def __init__(self) -> None:
        self._handle = None
        self.config: TrainConfig | None = None

    def start(self, config: TrainConfig, deliver: Deliver) -> None:
        from engine.api import start_training  # heavy (torch): imported by the call, once a run starts

        self.config = config
        self._handle = start_training(config, [deliver])

    @property
    def result(self) -> Any:
        """The run's ``RunResult`` once it has ended, else None."""
        return None if self._handle is None else self._handle.result

    @property
    def control(self):
        return None if self._handle is None else self._handle.control

    def submit(self, command: Command) -> None:
        if self._handle is not None:
            self._handle.control.submit(command)

    def wait(self, timeout: float | None = None) -> bool:
        if self._handle is None:
            return True
        return bool(self._handle.wait(timeout))

    @property
    def running(self) -> bool:
        return self._handle is not None and self._handle.thread.is_alive()

    @property
    def run_dir(self) -> Path | None:
        return None if self._handle is None else self._handle.run_dir

    owns_run = True

    def outcome(self) -> str | None:
        result = None if self._handle is None else self._handle.result
        return None if result is None else result.status
