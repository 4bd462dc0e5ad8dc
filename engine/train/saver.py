"""Checkpoint files and training states of a run, written where the plan (or the user) asks.

Before each write the run-ownership check (``engine.output_guard.refuse_foreign``) runs, unless
``--overwrite``: a run never replaces a file another run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.checkpoint import save_lora_file, save_lora_torch_file
from engine.config import TrainConfig
from engine.errors import CheckpointError, DiskFullError, SpykeError
from engine.events import CheckpointRemoved, CheckpointSaved, Event, LogMessage, PhaseChanged
from engine.kohya.names import TORCH_SAVE_FORMATS, checkpoint_filename, state_dirname
from engine.optimizers import eval_weights
from engine.output_guard import refuse_foreign
from engine.run.written import record_written
from engine.state import save_state
from engine.train.disk_guard import DiskGuard, checkpoint_need, state_need
from engine.train.progress import StepCounters
from engine.train.best_checkpoint import BEST_FILE, BestCheckpoint
from engine.train.pruning import Pruner


class Saver:
    """``resumable()`` gives what a state holds (lora, optimizer, scheduler, rng, progress);
    ``metadata(step, epoch)`` a checkpoint's kohya metadata; ``on_state(resumable)`` is told of each
    state written (the rollback snapshot)."""

    def __init__(self, cfg: TrainConfig, plan, run_id: str, counters: StepCounters, emit: Callable[[Event], None],
                 *, network, save_dtype, metadata: Callable[[int, int], dict[str, str]],
                 resumable: Callable[[], dict], on_state: Callable[[dict], None], optimizer=None,
                 guard: DiskGuard | None = None, run_dir: Path | None = None) -> None:
        self.cfg, self.plan, self.run_id = cfg, plan, run_id
        self.counters = counters
        self.emit = emit
        self.network, self.save_dtype = network, save_dtype
        self.metadata, self.resumable, self.on_state = metadata, resumable, on_state
        self.optimizer = optimizer          # a schedule-free one saves its eval weights
        self.state_step: int | None = None  # global step of the last state written or resumed from
        self.pruner = Pruner(cfg, plan, run_id, lambda level, text: emit(LogMessage(level=level, message=text)),
                             lambda path, step, why="": emit(CheckpointRemoved(
                                 level="info", path=str(path), step=step,
                                 message=f"removing old checkpoint: {path}" + (f" ({why})" if why else ""))),
                             best=BestCheckpoint(run_dir / BEST_FILE if run_dir is not None else None))
        self.guard = guard                  # the free-space check before each write, and what disk full does

    def forget_state(self) -> None:
        """The weights or learning rate changed since the last state: a state saved now is a new one."""
        self.state_step = None

    def save(self, kind: str, *, with_state: bool | None = None, then: str | None = None) -> Path | None:
        """Write a checkpoint (+ state when asked). ``kind``: step | epoch | final | manual | abort.
        ``then``: the phase after the save (default: training, or finished after the final one)."""
        c = self.counters
        step, epoch = c.global_step, c.current_epoch(self.plan.num_epochs)
        if kind == "final":
            name = checkpoint_filename(self.cfg.output_name, ext=self.cfg.save_model_as)
        elif kind == "epoch":
            name = checkpoint_filename(self.cfg.output_name, epoch=epoch, ext=self.cfg.save_model_as)
        else:
            name = checkpoint_filename(self.cfg.output_name, step=step, ext=self.cfg.save_model_as)
        if c.has_checkpoint(step, name) and kind in ("manual", "abort"):
            if with_state and self.state_step != step:  # e.g. an abort right after a save without --save_state
                self.save_training_state()
            return c.last_checkpoint
        self.emit(PhaseChanged(phase="saving", detail=name))
        out = Path(self.cfg.output_dir)
        loss = c.losses[-1] if c.losses else None
        if with_state is None:              # kohya: --save_state_on_train_end saves the last state on its own
            with_state = self.cfg.save_state or (kind == "final" and self.cfg.save_state_on_train_end)
        want_state = with_state
        self._make_room(name, step, with_state=want_state and not (
            kind != "final" and self.state_step == step and c.last_state_dir is not None))
        try:
            if not self.cfg.overwrite:
                refuse_foreign(out / name, self.run_id)
            with eval_weights(self.optimizer):  # a schedule-free optimizer's checkpoint holds its eval weights
                tensors = self.network.state_dict_kohya(self.save_dtype)
                if self.cfg.save_model_as in TORCH_SAVE_FORMATS:   # kohya: torch.save, the weights alone
                    saved = save_lora_torch_file(out / name, tensors)
                    record_written(saved.path, self.run_id, step)  # the run's id and step, kept beside
                else:
                    saved = save_lora_file(out / name, tensors, self.metadata(step, epoch))
        except DiskFullError as err:        # ENOSPC during the write: the temp file is gone, the old file intact
            self._on_disk_full(err, step)   # paused and resumed: try again
            return self.save(kind, with_state=with_state, then=then)
        except CheckpointError as err:
            raise CheckpointError(f"{err}{self._state_after_failed_save()}") from None
        c.record_checkpoint(step, name, saved.path)
        state_dir = None
        if want_state:
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

    # ---- disk full (engine.train.disk_guard)
    def _need(self, with_checkpoint: bool, with_state: bool) -> int:
        shapes = self.network.expected_shapes()
        need = checkpoint_need(shapes, self.save_dtype, self.cfg.save_model_as) if with_checkpoint else 0
        if with_state:
            need += state_need(shapes, self.optimizer.state_dict() if self.optimizer is not None else None)
        return need

    def _make_room(self, name: str, step: int, *, with_state: bool) -> None:
        """Refuse (then pause or stop) while the checkpoint (+ state) would not fit."""
        if self.guard is None:
            return
        what = f"{name}" + (" and its training state" if with_state else "")
        while (err := self.guard.refusal(self._need(True, with_state), what)) is not None:
            self._on_disk_full(err, step)

    def _on_disk_full(self, err: DiskFullError, step: int) -> None:
        """``pause``: returns once the user resumed (the caller retries). ``stop``: a state first if it fits,
        then raise."""
        if self.guard is not None and self.guard.mode == "pause":
            self.guard.wait_or_raise(err)
            return
        note = ""
        if self.state_step != step:
            if self.guard is None or self.guard.fits(self._need(False, True)):
                try:
                    note = f"; training state saved to {self.save_training_state(guarded=False)}"
                except SpykeError:
                    note = "; no room for a training state either"
            else:
                note = "; no room for a training state either"
        raise DiskFullError(f"{err}{note}") from None

    def save_training_state(self, final: bool = False, *, guarded: bool = True) -> Path:
        c = self.counters
        dest = Path(self.cfg.output_dir) / state_dirname(self.cfg.output_name, None if final else c.global_step)
        if not self.cfg.overwrite:
            refuse_foreign(dest, self.run_id, state=True)
        while True:
            if guarded and self.guard is not None:
                if (err := self.guard.refusal(self._need(False, True), f"training state {dest.name}")) is not None:
                    self.guard.wait_or_raise(err)
                    continue
            state = self.resumable()
            try:
                path = save_state(dest, lora_tensors=state["lora"], optimizer_state=state["optimizer"],
                                  scheduler_state=state["scheduler"], rng_state=state["rng"],
                                  progress=state["progress"])
            except DiskFullError as err:
                if not guarded or self.guard is None:
                    raise
                self.guard.wait_or_raise(err)
                continue
            break
        c.record_state(path)
        self.state_step = c.global_step
        self.on_state(state)
        return path
