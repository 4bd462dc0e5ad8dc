"""kohya's ``--initial_epoch``, ``--initial_step`` and ``--skip_until_initial_step``: where a run starts counting.

As ``train_network.py`` reads them (S = ``--initial_step``, else ``(initial_epoch - 1) × steps per epoch``,
steps being optimizer steps):

- S must stay below the run's total steps (kohya asserts ``max_train_steps > initial_step``); S = 0 (or
  ``--initial_epoch=1``) changes nothing.
- Without ``--skip_until_initial_step`` only the epoch number moves: the run starts at epoch ``S // steps per
  epoch`` + 1 with the global step at 0 and the epoch's first batch, and ends when the step count reaches the
  total or the epochs run out. Step files count from 1; epoch files carry the shifted epoch numbers.
- With it, the run starts after step S: the steps before are skipped without training (the epoch's batch
  order is the one a run from step 0 would have met), the global step counts on from S, and step files,
  epoch files, logs and metadata carry the true numbers.
- The learning-rate schedule is not moved: it starts from its beginning, or from a ``--resume`` state's.
  With ``--resume`` the state's step is ignored (kohya warns so) and these flags place the run.

Two places where kohya's loop does not do what its help and comments say, and spyke-cockpit does the
latter: after skipping whole epochs kohya sets the global step to the steps into the epoch (not S), and with
``--gradient_accumulation_steps`` > 1 it skips that many times too many epochs.
This module is light (no torch): the plan uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class StartPoint:
    """Where a run with ``--initial_step``/``--initial_epoch`` starts."""

    initial_step: int   # S, kohya's initial step
    step: int           # the global step before the first trained step (S when skipping, else 0)
    epoch: int          # 0-based epoch of the first trained step
    batch: int          # index of its batch group in that epoch
    skip: bool          # --skip_until_initial_step

    @property
    def epoch_offset(self) -> int:
        """Epochs counted before global step 0 (only without skipping: the epoch number moves alone)."""
        return 0 if self.skip else self.epoch

    def epoch_of(self, step: int, steps_per_epoch: int) -> int:
        """1-based epoch of global step ``step``."""
        return self.epoch_offset + (step - 1) // steps_per_epoch + 1

    def last_step(self, total_steps: int, num_epochs: int, steps_per_epoch: int) -> int:
        """The global step the run ends at: the total, or earlier when the epochs run out first."""
        return min(total_steps, (num_epochs - self.epoch_offset) * steps_per_epoch)

    def describe(self) -> str:
        if self.skip:
            return (f"--initial_step: skipping the first {self.initial_step} steps without training; starting at "
                    f"epoch {self.epoch + 1}, batch {self.batch + 1}; the learning-rate schedule is not moved")
        return (f"--initial_step: starting at epoch {self.epoch + 1} with the step count at 0 (kohya moves only the "
                "epoch number without --skip_until_initial_step); the learning-rate schedule is not moved")


def initial_step_of(cfg: Any, steps_per_epoch: int) -> int:
    """kohya's S: ``--initial_step``, else ``(--initial_epoch - 1) × steps per epoch``, else 0."""
    if cfg.initial_step is not None:
        return int(cfg.initial_step)
    if cfg.initial_epoch is not None:
        return (int(cfg.initial_epoch) - 1) * steps_per_epoch
    return 0


def start_point(cfg: Any, steps_per_epoch: int, total_steps: int) -> StartPoint | None:
    """The run's start from ``cfg`` (a TrainConfig); None when it starts at step 0, epoch 1 (or a resumed
    state places it). Raises a one-line ConfigError when S is not below the total steps."""
    s = initial_step_of(cfg, steps_per_epoch)
    if s <= 0:
        return None
    if s >= total_steps:
        flag = (f"--initial_step={cfg.initial_step}" if cfg.initial_step is not None
                else f"--initial_epoch={cfg.initial_epoch} (step {s})")
        raise ConfigError(f"{flag}: must be below the run's {total_steps} steps (kohya: max_train_steps should be "
                          "greater than initial step); lower it or train longer")
    epoch = s // steps_per_epoch
    if cfg.skip_until_initial_step:
        return StartPoint(s, s, epoch, s % steps_per_epoch, True)
    return StartPoint(s, 0, epoch, 0, False)
