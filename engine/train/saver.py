"""Checkpoint files and training states of a run, written where the plan (or the user) asks.

Before each write the run-ownership check (``engine.output_guard.refuse_foreign``) runs, unless
``--overwrite``: a run never replaces a file another run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.checkpoint import save_lora_file
from engine.config import TrainConfig
from engine.errors import CheckpointError, SpykeError
from engine.events import CheckpointSaved, Event, LogMessage, PhaseChanged
from engine.kohya.names import checkpoint_filename, state_dirname
from engine.optimizers import eval_weights
from engine.output_guard import refuse_foreign
from engine.state import save_state
from engine.train.progress import StepCounters
from engine.train.pruning import Pruner


class Saver:
    """``resumable()`` gives what a state holds (lora, optimizer, scheduler, rng, progress);
    ``metadata(step, epoch)`` a checkpoint's kohya metadata; ``on_state(resumable)`` is told of each
    state written (the rollback snapshot)."""

    def __init__(self, cfg: TrainConfig, plan, run_id: str, counters: StepCounters, emit: Callable[[Event], None],
                 *, network, save_dtype, metadata: Callable[[int, int], dict[str, str]],
                 resumable: Callable[[], dict], on_state: Callable[[dict], None], optimizer=None) -> None:
        self.cfg, self.plan, self.run_id = cfg, plan, run_id
        self.counters = counters
        self.emit = emit
        self.network, self.save_dtype = network, save_dtype
        self.metadata, self.resumable, self.on_state = metadata, resumable, on_state
        self.optimizer = optimizer          # a schedule-free one saves its eval weights
        self.state_step: int | None = None  # global step of the last state written or resumed from
        self.pruner = Pruner(cfg, plan, run_id, lambda level, text: emit(LogMessage(level=level, message=text)))

    def forget_state(self) -> None:
        """The weights or learning rate changed since the last state: a state saved now is a new one."""
        self.state_step = None

    def save(self, kind: str, *, with_state: bool | None = None, then: str | None = None) -> Path | None:
        """Write a checkpoint (+ state when asked). ``kind``: step | epoch | final | manual | abort.
        ``then``: the phase after the save (default: training, or finished after the final one)."""
        c = self.counters
        step, epoch = c.global_step, c.current_epoch(self.plan.num_epochs)
        if kind == "final":
            name = checkpoint_filename(self.cfg.output_name)
        elif kind == "epoch":
            name = checkpoint_filename(self.cfg.output_name, epoch=epoch)
        else:
            name = checkpoint_filename(self.cfg.output_name, step=step)
        if c.has_checkpoint(step, name) and kind in ("manual", "abort"):
            if with_state and self.state_step != step:  # e.g. an abort right after a save without --save_state
                self.save_training_state()
            return c.last_checkpoint
        self.emit(PhaseChanged(phase="saving", detail=name))
        out = Path(self.cfg.output_dir)
        loss = c.losses[-1] if c.losses else None
        try:
            if not self.cfg.overwrite:
                refuse_foreign(out / name, self.run_id)
            with eval_weights(self.optimizer):  # a schedule-free optimizer's checkpoint holds its eval weights
                tensors = self.network.state_dict_kohya(self.save_dtype)
                saved = save_lora_file(out / name, tensors, self.metadata(step, epoch))
        except CheckpointError as err:
            raise CheckpointError(f"{err}{self._state_after_failed_save()}") from None
        c.record_checkpoint(step, name, saved.path)
        state_dir = None
        if with_state if with_state is not None else self.cfg.save_state:
            if kind != "final" and self.state_step == step and c.last_state_dir is not None:
                state_dir = c.last_state_dir  # unchanged since (e.g. aborted right after resuming)
            else:
                state_dir = self.save_training_state(final=(kind == "final"))
        self.emit(CheckpointSaved(path=str(saved.path), step=step, epoch=epoch, bytes=saved.bytes, kind=kind,
                                  loss=loss, verified=saved.verified, state_dir=str(state_dir) if state_dir else None))
        self.pruner.after_save(kind, step, epoch)   # kohya's --save_last_n_*: only after a save that succeeded
        self.emit(PhaseChanged(phase=then or ("training" if kind != "final" else "finished"), detail=""))
        return saved.path

    def _state_after_failed_save(self) -> str:
        """A checkpoint could not be written: keep the run resumable if a state still can be."""
        try:
            path = self.save_training_state()
        except SpykeError:
            return ""
        return f" (training state saved to {path})"

    def save_training_state(self, final: bool = False) -> Path:
        c = self.counters
        dest = Path(self.cfg.output_dir) / state_dirname(self.cfg.output_name, None if final else c.global_step)
        if not self.cfg.overwrite:
            refuse_foreign(dest, self.run_id, state=True)
        state = self.resumable()
        path = save_state(dest, lora_tensors=state["lora"], optimizer_state=state["optimizer"],
                          scheduler_state=state["scheduler"], rng_state=state["rng"], progress=state["progress"])
        c.record_state(path)
        self.state_step = c.global_step
        self.on_state(state)
        return path
