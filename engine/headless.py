"""Headless training: one progress line per step, one per checkpoint; Ctrl-C saves and stops."""

from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from engine.config import TrainConfig
from engine.control import TrainingControl
from engine.errors import SpykeError
from engine.events import (AttentionKernel, CheckpointSaved, Event, LogMessage, NetworkBuilt, PhaseChanged,
                           RunFinished, RunStarted, SamplesSaved, StepCompleted, ValidationLoss)
from engine.fit.awake import keep_awake
from engine.units import format_bytes

SECOND_SIGINT_WINDOW = 3.0


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """Turns events into the headless output lines (an event sink)."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.total = 0
        self.num_epochs = 0
        self.started: float | None = None
        self.start_step = 0
        self.recent: list[float] = []
        self.validated_step: int | None = None

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    say = _print

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.total, self.num_epochs, self.start_step = event.total_steps, event.num_epochs, event.start_step
            self._print(f"run {event.run_id}: {event.total_steps} steps, {event.num_epochs} epochs, "
                        f"{event.batches_per_epoch} batches/epoch on {event.device}; seed {event.seed}; "
                        f"events in {event.output_dir}/.spyke/{event.run_id}/events.jsonl")
        elif isinstance(event, StepCompleted):
            now = time.monotonic()
            if self.started is None:
                self.started = now - event.step_seconds
            self.recent = (self.recent + [event.step_seconds])[-20:]
            avg = sum(self.recent) / len(self.recent)
            its = 1.0 / avg if avg > 0 else 0.0
            eta = (self.total - event.step) * avg
            lrs = "/".join(f"{v:.2e}" for v in event.lrs.values())
            loss = "nan (skipped)" if event.skipped else f"{event.loss:.4f}"
            norms = "" if event.keys_scaled is None else (
                f" | keys scaled {event.keys_scaled}, avg key norm {event.avg_key_norm:.4g}")
            self._print(f"step {event.step}/{self.total} | epoch {event.epoch}/{self.num_epochs} | loss {loss} | "
                        f"lr {lrs}{norms} | {its:.2f} it/s | ETA {format_duration(eta)}")
        elif isinstance(event, CheckpointSaved):
            state = f", state {event.state_dir}" if event.state_dir else ""
            self._print(f"checkpoint ({event.kind}) step {event.step}: {event.path} "
                        f"({format_bytes(event.bytes)}{', verified' if event.verified else ''}{state})")
        elif isinstance(event, SamplesSaved):
            made = [p for p in event.paths if p]
            where = f" in {made[0].rsplit('/', 1)[0]}" if made else ""
            failed = len(event.paths) - len(made)
            images = f"{len(made)} image{'' if len(made) == 1 else 's'}"
            self._print(f"samples step {event.step}: {images}{where} ({event.seconds:.1f}s"
                        f"{f', {failed} failed' if failed else ''})")
        elif isinstance(event, ValidationLoss) and event.step != self.validated_step:   # one line per pass
            self.validated_step = event.step
            self._print(f"validation loss {event.loss:.4f} at step {event.step} ({event.images} images)")
        elif isinstance(event, PhaseChanged) and event.phase in ("loading", "caching", "paused"):
            if event.phase != "caching" or event.detail.endswith(("/0", "0/")) is False:
                self._print(f"{event.phase}{': ' + event.detail if event.detail else ''}")
        elif isinstance(event, (NetworkBuilt, AttentionKernel)):
            self._print(event.message)
        elif isinstance(event, LogMessage) and event.level in ("warning", "error"):
            self._print(f"{event.level}: {event.message}")
        elif isinstance(event, RunFinished):
            line = f"finished: {event.status} at step {event.step}"
            if event.final_path:
                line += f" -> {event.final_path}"
            self._print(line)
            if event.status != "completed" and event.resume_hint:
                self._print(f"to resume: {event.resume_hint}")


def memory_startup_line(config: TrainConfig) -> str | None:
    """``memory: est. peak 5.1 GB of 21.0 GB available RAM · fits`` before anything loads. A run that
    cannot fit is refused here (MemoryCheckError, one line); any other bad input is left to the
    trainer, which reports it as before."""
    from engine.fit.preflight import MemoryCheckError
    from engine.plan import plan_run

    try:
        plan = plan_run(config)
    except MemoryCheckError:
        raise
    except SpykeError:
        return None
    return f"memory: {plan.memory.summary()}" if plan.memory is not None else None


def run_headless(config: TrainConfig, *, out: TextIO = sys.stdout) -> int:
    """Train in this thread. SIGINT/SIGTERM: save a checkpoint + state and stop (exit 0);
    a second SIGINT within 3 s exits at once (files are atomic, so none is partial)."""
    from engine.trackers import make_trackers, without_secrets
    from engine.trainer import Trainer

    control = TrainingControl()
    last_sigint = [0.0]

    def on_signal(signum, _frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and now - last_sigint[0] < SECOND_SIGINT_WINDOW:
            out.write("interrupted again: exiting now (no checkpoint written)\n")
            out.flush()
            import os

            os._exit(130)
        last_sigint[0] = now
        out.write(f"stopping ({signal.Signals(signum).name}): saving a checkpoint and state at the current step"
                  " — press Ctrl-C again within 3 s to exit at once\n")
        out.flush()
        control.abort(save=True)

    memory_line = memory_startup_line(config)
    if memory_line:
        out.write(memory_line + "\n")
        out.flush()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        printer = ProgressPrinter(out)
        trackers = make_trackers(config, say=printer.say)
        with keep_awake(config.no_prevent_sleep):
            result = Trainer(without_secrets(config), control=control, sinks=[printer, *trackers]).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not config.no_notify:               # nobody watches a headless run's end: ring and notify
        from engine.notify import notify_run_end

        notify_run_end(result.status, result.global_step, result.error,
                       run=result.run_dir.name if result.run_dir else config.output_name, out=out)
    return 0 if result.status in ("completed", "aborted") else 1
