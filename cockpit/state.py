"""The cockpit's UI state: a pure reducer over engine events (no Textual, no clock, no I/O).

``reduce(state, event) -> state`` folds one engine event (or one local UI action) into a new
:class:`CockpitState`. Widgets only render the state; derived figures that depend on the wall
clock (elapsed, ETA) are functions of ``(state, now)`` so a test can pin the clock.

The loss history is the one piece that grows with the run: a bounded, persistent
:class:`~cockpit.history.LossHistory`. A step gives the new state a history one step longer and
leaves the old state's as it was (they share storage), so ``reduce`` never changes the state it
is given, at O(1) amortised per step.

Its length is the one reducer: every event folds here, so the screen has one owner of its state
(the memory and sample sub-states are in ``cockpit.memory_state`` and ``cockpit.samples``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from cockpit.history import LossHistory, ema_update, smooth
from cockpit.memory_state import MEMORY_HISTORY, fold_memory, memory_pressure  # noqa: F401 - re-exported
from cockpit.samples import SampleBook, belongs, fold as fold_samples
from engine.api import (CheckpointRemoved, CheckpointSaved, Event, LogMessage, MemorySample, PhaseChanged,
                        RunFinished, RunStarted, SamplesSaved, StepCompleted, ValidationLoss, format_bytes)
from engine.api import resume_command as engine_resume_command

RATE_WINDOW = 20          # steps used for it/s
LOG_LIMIT = 200           # lines kept in the log panel
DEFAULT_SMOOTHING = 0.9


# ---------------------------------------------------------------- local UI actions
@dataclass(frozen=True)
class StartRequested:
    """The user pressed Start; the engine has not said anything yet."""


@dataclass(frozen=True)
class StartFailed:
    """The engine could not even start (bad config, missing model...)."""
    error: str


@dataclass(frozen=True)
class PauseRequested:
    """The user asked to pause (True) or resume (False); sent at once, applied by the engine at the next step
    boundary. Until the engine confirms (its PhaseChanged), the state says PAUSING… / RESUMING…."""
    paused: bool


@dataclass(frozen=True)
class PlanPreviewed:
    """The form's preview planned a run of ``total_steps`` (0: no valid plan); shown before Start."""
    total_steps: int
    num_epochs: int = 0


@dataclass(frozen=True)
class AbortRequested:
    save: bool


@dataclass(frozen=True)
class SaveRequested:
    pass


@dataclass(frozen=True)
class SmoothingChanged:
    smoothing: float


@dataclass(frozen=True)
class HistoryLoaded:
    """A viewer rebuilt the loss history from a run's events.jsonl (``spyke-cockpit attach``).

    Replaces the history, the EMA and the skipped-step count in one action, so reloading a
    run of 1,000,000 steps costs one reduce instead of one per step. ``exact`` is False for
    a coarse first picture (sampled from a big file) that an exact one replaces shortly.
    """
    history: "LossHistory"
    loss_ema: float | None
    ema_weight: float
    skipped_steps: int
    exact: bool = True


Action = (Event | StartRequested | StartFailed | PauseRequested | AbortRequested | SaveRequested
          | SmoothingChanged | HistoryLoaded | PlanPreviewed)

ENDED = ("completed", "aborted", "failed")
HOLD_ENDS = ("training", "finished")     # the phases that end a pause (the others can happen inside one)


# ---------------------------------------------------------------- state
@dataclass(frozen=True)
class CheckpointRow:
    step: int
    name: str
    path: str
    bytes: int
    loss: float | None
    verified: bool
    kind: str
    state_dir: str | None = None
    val_loss: float | None = None         # the validation loss of this checkpoint (matched by path or step)
    samples: int = 0                      # sample images made for this checkpoint
    removed: bool = False                 # the --save_last_n_* pruning removed the file later


@dataclass(frozen=True)
class LogLine:
    t: float
    level: str
    message: str


@dataclass(frozen=True)
class CockpitState:
    status: str = "idle"                 # idle | starting | running | completed | aborted | failed
    phase: str = ""
    phase_detail: str = ""
    run_id: str = ""
    output_dir: str = ""
    output_name: str = ""
    device: str = ""
    total_steps: int = 0
    num_epochs: int = 0
    batches_per_epoch: int = 0
    start_step: int = 0
    checkpoint_steps: tuple[int, ...] = ()
    step: int = 0
    epoch: int = 0
    loss: float | None = None
    loss_ema: float | None = None
    ema_weight: float = 0.0
    smoothing: float = DEFAULT_SMOOTHING
    lrs: tuple[tuple[str, float], ...] = ()
    skipped_steps: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    last_event_at: float | None = None
    rate_window: tuple[tuple[float, int], ...] = ()
    memory: MemorySample | None = None
    memory_history: tuple[int, ...] = ()
    swap_at_start: int | None = None      # swap in use at the run's first memory sample
    swap_growth: int = 0                  # swap in use now minus that
    checkpoints: tuple[CheckpointRow, ...] = ()
    log: tuple[LogLine, ...] = ()
    paused: bool = False                  # the engine says it is paused
    pause_requested: bool = False         # the user's latest wish
    abort_requested: bool = False
    abort_save: bool = False              # the abort asked for saves a checkpoint first
    pending: str = ""                     # a command sent, not yet confirmed by the engine: pause | resume | abort
    paused_since: float | None = None     # the engine's pause began then (event time); None when not paused
    paused_total: float = 0.0             # seconds of earlier, finished pauses (not counted in elapsed and it/s)
    last_state_dir: str | None = None     # the newest training state the run saved (what --resume latest finds)
    previous_status: str = ""             # the status before a Start that may still fail (StartFailed restores it)
    error: str | None = None
    final_path: str | None = None
    resume_hint: str | None = None
    fits: tuple[str, ...] = ()            # out of memory: the settings that would fit (engine's words)
    history: LossHistory = field(default_factory=LossHistory, compare=False, repr=False)
    sample_book: SampleBook = field(default_factory=SampleBook)   # sample sets and validation losses by step
    lr_history: tuple[tuple[str, LossHistory], ...] = field(default=(), compare=False, repr=False)
    version: int = 0                      # bumped on every change (widgets skip redraws when equal)

    @property
    def running(self) -> bool:
        return self.status in ("starting", "running")


def _log(state: CockpitState, t: float, level: str, message: str) -> tuple[LogLine, ...]:
    line = LogLine(t, level, " ".join(str(message).split()))
    return (state.log + (line,))[-LOG_LIMIT:]


def reduce(state: CockpitState, event: Action) -> CockpitState:
    """Fold one engine event or UI action into a new state."""
    v = state.version + 1
    if isinstance(event, StepCompleted):
        return _reduce_step(state, event, v)
    if isinstance(event, MemorySample):
        return fold_memory(state, event, v)
    if isinstance(event, RunStarted):
        resumed = f" (resumed at step {event.start_step})" if event.start_step else ""
        fresh = CockpitState(smoothing=state.smoothing, log=state.log)
        return replace(
            fresh,
            status="running", phase=state.phase or "loading", run_id=event.run_id, output_dir=event.output_dir,
            output_name=event.output_name, device=event.device, total_steps=event.total_steps,
            num_epochs=event.num_epochs, batches_per_epoch=event.batches_per_epoch, start_step=event.start_step,
            checkpoint_steps=tuple(sorted(event.checkpoint_steps)), step=event.start_step,
            started_at=event.t, last_event_at=event.t, pause_requested=state.pause_requested,
            log=_log(fresh, event.t, "info", f"run {event.run_id}: {event.total_steps} steps, {event.num_epochs} "
                     f"epochs on {event.device}{resumed}"),
            pending=state.pending if state.pending != "abort" else "", version=v)
    if isinstance(event, PhaseChanged):
        return replace(_reduce_phase(state, event, v), log=_phase_log(state, event))
    if isinstance(event, CheckpointSaved):
        row = CheckpointRow(step=event.step, name=Path(event.path).name, path=event.path, bytes=event.bytes,
                            loss=event.loss, verified=event.verified, kind=event.kind, state_dir=event.state_dir)
        book = state.sample_book
        row = replace(row, val_loss=book.validation_for(row.step, row.path), samples=book.images_for(row.step, row.path))
        rows = tuple(r for r in state.checkpoints if r.path != row.path) + (row,)
        ok = "verified" if event.verified else "NOT verified"
        message = f"saved {row.name} at step {event.step} ({format_bytes(event.bytes)}, {ok})"
        return replace(state, checkpoints=rows, last_event_at=event.t,
                       log=_log(state, event.t, "info" if event.verified else "warning", message), version=v,
                       last_state_dir=event.state_dir or state.last_state_dir)
    if isinstance(event, ValidationLoss):
        book = fold_samples(state.sample_book, event)
        rows = tuple(replace(r, val_loss=event.loss) if _matches(r, event.step, event.checkpoint) else r
                     for r in state.checkpoints)
        value = f"{event.loss:.4f}" if math.isfinite(event.loss) else str(event.loss)
        message = f"validation loss {value} at step {event.step} ({event.images} images)"
        return replace(state, checkpoints=rows, last_event_at=event.t, log=_log(state, event.t, "info", message),
                       sample_book=book, version=v)
    if isinstance(event, SamplesSaved):
        book = fold_samples(state.sample_book, event)
        rows = tuple(replace(r, samples=book.images_for(r.step, r.path))
                     if _matches(r, event.step, event.checkpoint) else r for r in state.checkpoints)
        n = len(event.paths)
        log = _log(state, event.t, "info", f"samples: {n} image{'s' if n != 1 else ''} at step {event.step} "
                                           f"({event.seconds:.1f} s)")
        for error in event.errors:
            if error:
                log = _log(replace(state, log=log), event.t, "warning", f"sample failed: {error}")
        return replace(state, checkpoints=rows, last_event_at=event.t, log=log, sample_book=book, version=v)
    if isinstance(event, CheckpointRemoved):
        rows = tuple(replace(r, removed=True) if r.path == event.path else r for r in state.checkpoints)
        return replace(state, checkpoints=rows, log=_log(state, event.t, event.level, event.message), version=v)
    if isinstance(event, LogMessage):
        return replace(state, log=_log(state, event.t, event.level, event.message), version=v)
    if isinstance(event, RunFinished):
        log = state.log
        if event.status == "failed" and event.error:
            if not (log and log[-1].level == "error" and log[-1].message == " ".join(event.error.split())):
                log = _log(state, event.t, "error", event.error)      # the engine logged it already: once
        elif event.status == "aborted":
            log = _log(state, event.t, "warning", f"run aborted at step {event.step}")
        else:
            log = _log(state, event.t, "info", f"run {event.status} at step {event.step}")
        return replace(state, status=event.status, phase="finished", paused=False, pause_requested=False,
                       pending="", paused_since=None, paused_total=_pauses_until(state, event.t),
                       step=max(state.step, event.step), error=event.error, final_path=event.final_path,
                       resume_hint=event.resume_hint, fits=tuple(event.fits), finished_at=event.t,
                       last_event_at=event.t, log=log, version=v)
    if isinstance(event, StartRequested):
        # What the last run showed stays on screen until the new one starts (RunStarted) or fails to.
        return replace(state, status="starting", phase="loading", phase_detail="", pending="", error=None,
                       abort_requested=False, paused=False, pause_requested=False,
                       previous_status=state.status, version=v)
    if isinstance(event, StartFailed):
        if state.previous_status in ENDED and state.run_id:     # the last run's screen is kept as it was
            return replace(state, status=state.previous_status, phase="finished",
                           log=_log(state, state.last_event_at or 0.0, "error", event.error), version=v)
        return replace(state, status="failed", phase="finished", error=event.error,
                       log=_log(state, state.last_event_at or 0.0, "error", event.error), version=v)
    if isinstance(event, PauseRequested):
        if not state.running or state.abort_requested:
            return state
        # Asking for what the engine already does (e.g. resume before it got to pause) waits for nothing.
        pending = "" if event.paused == state.paused else ("pause" if event.paused else "resume")
        wish = "pause" if event.paused else "resume"
        return replace(state, pause_requested=event.paused, pending=pending,
                       log=_log(state, state.last_event_at or 0.0, "info", f"{wish} requested at step {state.step}"),
                       version=v)
    if isinstance(event, AbortRequested):
        how = "save and stop" if event.save else "stop without saving"
        return replace(state, abort_requested=True, abort_save=event.save, pause_requested=False,
                       pending="abort", log=_log(state, state.last_event_at or 0.0, "warning",
                                                 f"abort requested at step {state.step} ({how})"), version=v)
    if isinstance(event, PlanPreviewed):
        if state.status != "idle":
            return state
        return replace(state, total_steps=max(0, int(event.total_steps)), num_epochs=max(0, int(event.num_epochs)),
                       version=v)
    if isinstance(event, SaveRequested):
        return replace(state, log=_log(state, state.last_event_at or 0.0, "info",
                                       f"save requested at step {state.step}"), version=v)
    if isinstance(event, HistoryLoaded):
        return replace(state, history=event.history, loss_ema=event.loss_ema, ema_weight=event.ema_weight,
                       skipped_steps=event.skipped_steps, version=v)
    if isinstance(event, SmoothingChanged):
        s = min(0.999, max(0.0, float(event.smoothing)))
        xs, ys, ns = state.history.series(len(state.history) or 1)
        ema = smooth(ys, ns, s)
        return replace(state, smoothing=s, loss_ema=ema[-1] if ema else None, ema_weight=1.0 if ema else 0.0,
                       version=v)
    return state


def _matches(row: CheckpointRow, step: int, checkpoint: str | None) -> bool:
    return belongs(step, checkpoint, row.step, row.path)


_QUIET_PHASES = ("saving", "finished")     # the checkpoint and the finish have their own log lines


def _phase_log(state: CockpitState, event: PhaseChanged) -> tuple[LogLine, ...]:
    """One log line per phase change (not per progress detail of the same phase)."""
    phase, before = event.phase, state.phase
    if phase in _QUIET_PHASES or (phase == before and (phase != "loading" or event.detail == state.phase_detail)):
        return state.log                   # (a run starts in "loading"; the engine's loading names the model)
    if phase == "paused":
        return _log(state, event.t, "info", f"paused at step {state.step}")
    if before == "paused":
        return _log(state, event.t, "info", f"resumed at step {state.step}")
    if phase == "training" and before in ("saving", "sampling", "validating"):
        return state.log
    detail = f" ({event.detail})" if event.detail else ""
    words = {"caching": "caching latents", "sampling": "making samples", "validating": "validation"}
    return _log(state, event.t, "info", f"{words.get(phase, phase)}{detail}")


def _pauses_until(state: CockpitState, t: float) -> float:
    """Seconds paused up to ``t`` (the finished pauses and the current one)."""
    current = max(0.0, t - state.paused_since) if state.paused_since is not None else 0.0
    return state.paused_total + current


def _reduce_phase(state: CockpitState, event: PhaseChanged, version: int) -> CockpitState:
    paused = event.phase == "paused"
    held = state.paused_since is not None
    pause_requested, pending = state.pause_requested, state.pending
    paused_since, paused_total = state.paused_since, state.paused_total
    if paused:
        pause_requested = True          # also when another viewer paused the run
        if pending == "pause":
            pending = ""
        if not held:
            paused_since = event.t
    elif event.phase in HOLD_ENDS:
        if held:
            paused_total, paused_since = _pauses_until(state, event.t), None
            pause_requested = False
        if pending == "resume" or (pending == "pause" and event.phase == "finished"):
            pending = ""
    # A pause (and a save or sample inside it) keeps the speed measured before it: no reset, no jump.
    keep_rate = held or paused
    return replace(state, phase=event.phase, phase_detail=event.detail, paused=paused,
                   pause_requested=pause_requested, pending=pending, paused_since=paused_since,
                   paused_total=paused_total, rate_window=state.rate_window if keep_rate else (),
                   last_event_at=event.t,
                   status="running" if state.status in ("idle", "starting") else state.status, version=version)


def _reduce_step(state: CockpitState, event: StepCompleted, version: int) -> CockpitState:
    loss = event.loss
    ema, weight = state.loss_ema, state.ema_weight
    history = state.history
    if not event.skipped and math.isfinite(loss):
        history = history.appended(event.step, loss)
        ema, weight = ema_update(ema, weight, loss, state.smoothing)
    lrs = tuple(sorted(event.lrs.items()))
    lr_history = state.lr_history
    if lrs:
        if tuple(name for name, _ in lr_history) != tuple(name for name, _ in lrs):
            old = dict(lr_history)
            lr_history = tuple((name, old.get(name) or LossHistory()) for name, _ in lrs)
        lr_history = tuple((name, h.appended(event.step, value)) for (name, h), (_, value) in zip(lr_history, lrs))
    # timed on the run's own clock: the time spent paused is taken out
    window = (state.rate_window + ((event.t - _pauses_until(state, event.t), event.step),))[-RATE_WINDOW:]
    return replace(state, step=event.step, epoch=event.epoch, loss=loss, loss_ema=ema, ema_weight=weight,
                   history=history, lr_history=lr_history, lrs=lrs, rate_window=window,
                   skipped_steps=state.skipped_steps + (1 if event.skipped else 0),
                   last_event_at=event.t, status="running" if state.status == "starting" else state.status,
                   version=version)


def reduce_all(state: CockpitState, events: Iterable[Action]) -> CockpitState:
    for event in events:
        state = reduce(state, event)
    return state


# ---------------------------------------------------------------- derived figures
def steps_per_second(state: CockpitState) -> float | None:
    w = state.rate_window
    if len(w) < 2:
        return None
    dt = w[-1][0] - w[0][0]
    ds = w[-1][1] - w[0][1]
    if dt <= 0 or ds <= 0:
        return None
    return ds / dt


def elapsed(state: CockpitState, now: float) -> float:
    """Seconds the run has trained: the clock stops while it is paused."""
    if state.started_at is None:
        return 0.0
    end = state.finished_at if state.finished_at is not None else now
    return max(0.0, end - state.started_at - _pauses_until(state, end))


def eta_seconds(state: CockpitState) -> float | None:
    rate = steps_per_second(state)
    if rate is None or not state.total_steps:
        return None
    return max(0, state.total_steps - state.step) / rate


def next_checkpoint(state: CockpitState) -> int | None:
    for step in state.checkpoint_steps:
        if step > state.step:
            return step
    return None


def eta_next_checkpoint(state: CockpitState) -> float | None:
    rate = steps_per_second(state)
    target = next_checkpoint(state)
    if rate is None or target is None:
        return None
    return (target - state.step) / rate


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def last_state_dir(state: CockpitState) -> str | None:
    """The newest checkpoint's training-state folder (what ``--resume`` takes)."""
    for row in reversed(state.checkpoints):
        if row.state_dir:
            return row.state_dir
    return None


def resume_command(state: CockpitState) -> str | None:
    """The complete command that resumes this run: the one the engine named as it stopped (its own
    config.toml with ``--resume`` and the state it saved last), else the same command built for the
    newest state among its checkpoints. None while the run is live, after it completed, or while
    there is no saved state to resume from."""
    if state.status not in ("aborted", "failed"):
        return None
    if state.resume_hint:
        return state.resume_hint
    state_dir = last_state_dir(state)
    if state_dir is None or not state.output_dir or not state.run_id:
        return None
    return engine_resume_command(state.output_dir, state.run_id, state_dir)


def best_validation(state: CockpitState) -> CheckpointRow | None:
    """The checkpoint with the lowest validation loss (None when none has one)."""
    rows = [r for r in state.checkpoints if r.val_loss is not None and math.isfinite(r.val_loss)]
    return min(rows, key=lambda r: r.val_loss, default=None)


def progress_text(state: CockpitState) -> str:
    """The line scripts read through tmux: always contains ``step N/TOTAL``."""
    return f"step {state.step}/{state.total_steps}"


def status_word(state: CockpitState) -> tuple[str, str, str]:
    """(word, detail, tone) for the progress line. A command the engine has not confirmed yet reads
    ``PAUSING…`` / ``RESUMING…`` / ``ABORTING…``; ``PAUSED`` only once the engine says it has paused.
    ``tone`` is one of: pending, paused, failed, aborted, done, phase."""
    if state.running and state.abort_requested:
        what = "saving a checkpoint, then stopping" if state.abort_save else "stopping without saving"
        return "ABORTING…", f"{what} at the next step boundary", "pending"
    if state.running and state.pending == "pause":
        return "PAUSING…", "the step in flight finishes first", "pending"
    if state.running and state.pending == "resume":
        return "RESUMING…", "", "pending"
    if state.paused:
        return "PAUSED", "model kept loaded · space resumes", "paused"
    if state.status == "failed":
        return "FAILED", "", "failed"
    if state.status == "aborted":
        return "ABORTED", "", "aborted"
    if state.status == "completed":
        return "FINISHED", "", "done"
    return (state.phase or "starting").upper(), state.phase_detail, "phase"
