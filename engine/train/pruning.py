"""kohya's ``--save_last_n_*`` pruning: after each step or epoch save, the file (and state) that fell
out of the window is removed — only when this run wrote it, and never a protected one (the
best-validation checkpoint: ``engine.train.best_checkpoint``).

The rules are kohya's ``get_remove_step_no`` / ``get_remove_epoch_no`` and its state variants;
:func:`removals` is pure so the plan can list the survivors before the run. Light: no torch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.kohya.names import checkpoint_filename, state_dirname
from engine.train.best_checkpoint import BestCheckpoint


def _ext(cfg) -> str:
    return getattr(cfg, "save_model_as", None) or "safetensors"


def every_n_epochs(cfg, num_epochs: int) -> int | None:
    """The epoch-save interval: ``--save_n_epoch_ratio`` sets it as kohya does (epochs // ratio, at least
    1), else ``--save_every_n_epochs``."""
    if cfg.save_n_epoch_ratio:
        return max(1, num_epochs // cfg.save_n_epoch_ratio)
    return cfg.save_every_n_epochs


def removed_step_file(cfg, step: int) -> int | None:
    """kohya's get_remove_step_no: the step whose step file goes after saving at ``step``."""
    if cfg.save_last_n_steps is None or not cfg.save_every_n_steps:
        return None
    gone = step - cfg.save_last_n_steps - 1
    gone -= gone % cfg.save_every_n_steps
    return gone if gone >= 0 else None


def removed_step_state(cfg, step: int) -> int | None:
    """kohya's save_and_remove_state_stepwise: the step whose state goes (``_state`` window, else the files')."""
    keep = cfg.save_last_n_steps_state or cfg.save_last_n_steps
    if keep is None or not cfg.save_every_n_steps:
        return None
    gone = step - keep - 1
    gone -= gone % cfg.save_every_n_steps
    return gone if gone > 0 else None


def removed_epoch(keep: int | None, every: int | None, epoch: int) -> int | None:
    """kohya's get_remove_epoch_no (and its state twin): the epoch that goes after saving ``epoch``."""
    if keep is None or not every:
        return None
    gone = epoch - every * keep
    return gone if gone >= 0 else None


@dataclass(frozen=True)
class Removal:
    files: tuple[str, ...]               # checkpoint file names
    state_steps: tuple[int, ...]         # global steps of state folders (ours are named by step)


def removals(cfg, kind: str, step: int, epoch: int, *, every_epochs: int | None,
             epoch_step: Callable[[int], int | None]) -> Removal:
    """What kohya removes right after a ``kind`` (step | epoch) save at ``step``/``epoch``.
    ``epoch_step(e)``: the global step at which epoch ``e``'s file was saved (None: never)."""
    files: list[str] = []
    states: list[int] = []
    if kind == "step":
        if (gone := removed_step_file(cfg, step)) is not None:
            files.append(checkpoint_filename(cfg.output_name, step=gone, ext=_ext(cfg)))
        if (gone := removed_step_state(cfg, step)) is not None:
            states.append(gone)
    elif kind == "epoch":
        if (gone := removed_epoch(cfg.save_last_n_epochs, every_epochs, epoch)) is not None:
            files.append(checkpoint_filename(cfg.output_name, epoch=gone, ext=_ext(cfg)))
        keep = cfg.save_last_n_epochs_state or cfg.save_last_n_epochs
        if (gone := removed_epoch(keep, every_epochs, epoch)) is not None and (at := epoch_step(gone)) is not None:
            states.append(at)
    return Removal(tuple(files), tuple(states))


class Pruner:
    """Removes what fell out of the ``--save_last_n_*`` windows after each successful save.

    ``protected``: paths never removed; ``best`` (:class:`BestCheckpoint`): the checkpoint with the lowest
    validation loss so far, never removed either (told of each loss by :meth:`validated`).
    ``removed(path, step, why)`` is told of each checkpoint file removed."""

    def __init__(self, cfg, plan, run_id: str, log: Callable[[str, str], None],
                 removed: Callable[[Path, int, str], None] | None = None,
                 best: BestCheckpoint | None = None) -> None:
        self.cfg, self.plan, self.run_id, self.log = cfg, plan, run_id, log
        self.removed = removed or (lambda path, step, why="": log(
            "info", f"removing old checkpoint: {path}" + (f" ({why})" if why else "")))
        self.protected: set[Path] = set()
        self.best = best if best is not None else BestCheckpoint(None)
        self._epoch_steps = {c.epoch: c.step for c in plan.checkpoints if c.kind == "epoch"}

    def _is_protected(self, path: Path) -> bool:
        return any(path.resolve() == p.resolve() for p in self.protected)

    def _remove_file(self, path: Path, why: str = "") -> bool:
        """Remove a checkpoint file of this run (never another run's)."""
        from engine.output_guard import lora_step_of_run

        if not path.is_file():
            return False
        step_of_file = lora_step_of_run(path, self.run_id)
        if step_of_file is None:
            self.log("warning", f"not removing old checkpoint {path}: it is not from this run")
            return False
        path.unlink()
        self.removed(path, step_of_file, why)
        return True

    def validated(self, path: Path, step: int, loss: float) -> None:
        """A checkpoint's validation loss: it may become the one kept; the one kept before goes once it
        is no longer the best and is out of its window."""
        former = self.best.validated(Path(path).name, step, loss)
        if former is not None and not self._is_protected(Path(self.cfg.output_dir) / former.file):
            self._remove_file(Path(self.cfg.output_dir) / former.file, "no longer the best validation loss")

    def after_save(self, kind: str, step: int, epoch: int) -> list[Path]:
        """Prune after a ``kind`` save; returns what was removed."""
        from engine.output_guard import state_step_of_run

        if kind not in ("step", "epoch"):
            return []
        out = Path(self.cfg.output_dir)
        plan_every = getattr(self.plan, "save_every_n_epochs", None)
        every = plan_every if plan_every is not None else every_n_epochs(self.cfg, self.plan.num_epochs)
        todo = removals(self.cfg, kind, step, epoch, every_epochs=every, epoch_step=self._epoch_steps.get)
        removed: list[Path] = []
        for name in todo.files:
            path = out / name
            if not path.is_file() or self._is_protected(path):
                continue
            if (best := self.best.protects(name)) is not None:
                self.log("info", f"keeping old checkpoint {path}: {best.why()}")
                self.best.hold()
                continue
            if self._remove_file(path):
                removed.append(path)
        for state_step in todo.state_steps:
            path = out / state_dirname(self.cfg.output_name, state_step)
            if not path.is_dir() or self._is_protected(path):
                continue
            if state_step_of_run(path, self.run_id) is None:
                self.log("warning", f"not removing old state {path}: it is not from this run")
                continue
            shutil.rmtree(path)
            removed.append(path)
            self.log("info", f"removing old state: {path}")
        return removed


def survivors(cfg, checkpoints, every_epochs: int | None) -> list:
    """The planned checkpoints still on disk at the end once kohya's pruning has run (same order)."""
    epoch_steps = {c.epoch: c.step for c in checkpoints if c.kind == "epoch"}
    gone: set[str] = set()
    for c in checkpoints:
        gone.update(removals(cfg, c.kind, c.step, c.epoch, every_epochs=every_epochs,
                             epoch_step=epoch_steps.get).files)
    return [c for c in checkpoints if c.filename not in gone]
