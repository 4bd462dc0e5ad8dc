"""Where a run stands: its step counters, losses and saved files, owned by one object.

``StepCounters`` is the live position, changed only through its methods; ``engine.state.Progress``
is the serialised copy of it a training state carries (see :meth:`StepCounters.to_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.state import Progress


@dataclass
class StepCounters:
    global_step: int = 0
    epoch: int = 0                  # 0-based epoch the next step belongs to
    batch_in_epoch: int = 0         # index of the next step's batch group in that epoch's order
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    last_state_dir: Path | None = None
    last_checkpoint: Path | None = None
    resume_with: Callable[[Path], str] | None = None   # the run folder's resume command (engine.run.folder)
    _saved_keys: set[tuple[int, str]] = field(default_factory=set, init=False, repr=False)

    # ---- position
    def place(self, global_step: int, epoch: int = 0, batch_in_epoch: int = 0) -> None:
        """Stand at a saved position (a resumed state, or a finished run's last step)."""
        self.global_step, self.epoch, self.batch_in_epoch = global_step, epoch, batch_in_epoch

    def rewind(self, progress: Progress) -> None:
        """Go back to an earlier position, dropping the losses recorded after it."""
        self.place(progress.global_step, progress.epoch, progress.batch_in_epoch)
        del self.losses[progress.global_step:]

    def finish_step(self, loss: float, steps_per_epoch: int) -> bool:
        """Count one optimizer step with its loss; True when it completed an epoch."""
        self.global_step += 1
        self.batch_in_epoch += 1
        self.losses.append(loss)
        if self.batch_in_epoch >= steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            return True
        return False

    def current_epoch(self, num_epochs: int) -> int:
        """1-based epoch of the last completed step (the one just finished at an epoch boundary)."""
        if self.batch_in_epoch == 0 and self.global_step > 0:
            return max(1, self.epoch)
        return min(self.epoch + 1, num_epochs)

    def to_state(self, **run: Any) -> Progress:
        """The serialised position; ``run``: seed, run_id, config, lr_scale, nan_skipped."""
        return Progress(global_step=self.global_step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, **run)

    # ---- saved files
    def has_checkpoint(self, step: int, name: str) -> bool:
        return (step, name) in self._saved_keys

    def record_checkpoint(self, step: int, name: str, path: Path) -> None:
        self._saved_keys.add((step, name))
        self.saved.append(path)
        self.last_checkpoint = path

    def record_state(self, path: Path) -> None:
        self.last_state_dir = path

    def resume_hint(self) -> str | None:
        """The full command that resumes from the newest state (None: no state, or no run folder yet)."""
        if self.last_state_dir is None or self.resume_with is None:
            return None
        return self.resume_with(self.last_state_dir)
