"""Test doubles for the cockpit."""

from __future__ import annotations

import threading
from pathlib import Path

from cockpit.sources import Deliver
from engine.api import Event, TrainConfig


class FakeSource:
    """A scripted source for tests: records commands; the test feeds events with :meth:`emit`."""

    def __init__(self, *, start_error: Exception | None = None) -> None:
        self.commands: list[str] = []
        self.configs: list[TrainConfig] = []
        self.start_error = start_error
        self._deliver: Deliver | None = None
        self._running = False
        self._done = threading.Event()
        self._done.set()

    def start(self, config: TrainConfig, deliver: Deliver) -> None:
        self.commands.append("start")
        self.configs.append(config)
        if self.start_error is not None:
            raise self.start_error
        self._deliver = deliver
        self._running = True
        self._done.clear()

    def emit(self, *events: Event) -> None:
        assert self._deliver is not None, "start() first"
        for event in events:
            self._deliver(event)
            if event.type == "finished":
                self.finish()

    def finish(self) -> None:
        self._running = False
        self._done.set()

    def pause(self) -> None:
        self.commands.append("pause")

    def resume(self) -> None:
        self.commands.append("resume")

    def save(self) -> None:
        self.commands.append("save")

    def abort(self, save: bool) -> None:
        self.commands.append("abort" if save else "abort_no_save")

    def sample(self) -> None:
        self.commands.append("sample")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def run_dir(self) -> Path | None:
        return None

    owns_run = True

    def outcome(self) -> str | None:
        return None
