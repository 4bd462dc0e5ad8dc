"""UI -> engine commands, applied by the engine at step boundaries.

Any thread may call ``pause``/``resume``/``save``/``abort``/``sample``; the training thread
calls ``between_steps`` once per step and, while paused, waits there with the model
kept loaded. Commands are idempotent flags, so a repeated key press is harmless.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum
from typing import Callable


class Command(str, Enum):
    PAUSE = "pause"
    RESUME = "resume"
    SAVE = "save"
    ABORT = "abort"             # save a checkpoint, then stop
    ABORT_NO_SAVE = "abort_no_save"
    SAMPLE = "sample"           # make sample images now (at the next step boundary, or at once while paused)


class Commands:
    """The five control verbs, spelled once: a subclass says how one command is delivered (``submit``) —
    to the training thread in this process, to a run's command folder from a viewer, or to a live source."""

    def submit(self, command: Command) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        self.submit(Command.PAUSE)

    def resume(self) -> None:
        self.submit(Command.RESUME)

    def save(self) -> None:
        """Save a checkpoint at the next step boundary (at once while paused)."""
        self.submit(Command.SAVE)

    def sample(self) -> None:
        """Make sample images at the next step boundary (at once while paused)."""
        self.submit(Command.SAMPLE)

    def abort(self, save: bool) -> None:
        """Stop the run, saving a checkpoint first when ``save``."""
        self.submit(Command.ABORT if save else Command.ABORT_NO_SAVE)


@dataclass(frozen=True)
class BoundaryDecision:
    save_now: bool
    abort: bool
    abort_save: bool
    sample_now: bool = False


class TrainingControl(Commands):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._save_requested = False
        self._sample_requested = False
        self._abort: bool | None = None   # None = no abort; True/False = with/without saving

    # ------------------------------------------------------------ any thread
    def submit(self, command: Command | str) -> None:
        command = Command(command)
        with self._cond:
            if command is Command.PAUSE:
                self._paused = True
            elif command is Command.RESUME:
                self._paused = False
            elif command is Command.SAVE:
                self._save_requested = True
            elif command is Command.ABORT:
                self._abort = True if self._abort is None else self._abort
            elif command is Command.ABORT_NO_SAVE:
                self._abort = False
            elif command is Command.SAMPLE:
                self._sample_requested = True
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def abort_requested(self) -> bool:
        return self._abort is not None

    # ------------------------------------------------------------ engine thread
    def _take(self) -> BoundaryDecision:
        decision = BoundaryDecision(self._save_requested, self._abort is not None, bool(self._abort),
                                    self._sample_requested)
        self._save_requested = self._sample_requested = False
        return decision

    def between_steps(self, on_pause: Callable[[bool], None], on_save: Callable[[], None],
                      poll: Callable[[], None] | None = None, poll_interval: float = 0.25,
                      on_sample: Callable[[], None] | None = None) -> BoundaryDecision:
        """Apply pending commands. Blocks while paused (calling ``on_pause(True)`` once on entering
        and ``on_pause(False)`` on leaving); a save (or, given ``on_sample``, a sample) request while
        paused is served at once via ``on_save`` / ``on_sample``. ``poll`` lets an external channel feed
        commands while waiting. Returns what the loop must still do: save or sample now (when not
        paused) and/or abort."""
        if poll is not None:
            poll()
        with self._cond:
            if not self._paused or self._abort is not None:
                return self._take()
        on_pause(True)
        try:
            while True:
                with self._cond:
                    if self._abort is not None or not self._paused:
                        return self._take()
                    save = self._save_requested
                    sample = on_sample is not None and self._sample_requested
                    self._save_requested = False
                    self._sample_requested = self._sample_requested and not sample
                    if not save and not sample:
                        self._cond.wait(poll_interval)
                if save:
                    on_save()
                if sample:
                    on_sample()
                if poll is not None:
                    poll()
        finally:
            on_pause(False)
