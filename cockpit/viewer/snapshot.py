"""The snapshot of a run's journal: everything the panels need, as reducer actions, in time
independent of the run's length.

A run of 1,000,000 steps writes ~170 MB of step records. The snapshot does not parse them one by
one. It finds the few records the panels need (run start, phases, checkpoints, log lines, the last
memory samples, the last steps) with byte searches from either end of the file, and rebuilds the
loss history separately: exactly when the file is small, otherwise as a coarse picture from a few
thousand sampled lines that the tail source (:mod:`cockpit.viewer.tail`) then replaces with the
exact history, chunk by chunk.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cockpit.history import LossHistory, ema_update
from cockpit.state import DEFAULT_SMOOTHING, MEMORY_HISTORY, RATE_WINDOW, HistoryLoaded
from engine.api import (EVENT_TYPES, SKIPPED, CheckpointSaved, Event, LogMessage, MemorySample, PhaseChanged,
                        RunFinished, RunStarted, StepCompleted, line_at, parse_line, step_loss, step_losses, type_token)

EXACT_BYTES = 4 << 20          # below this many bytes of records the snapshot history is exact at once
SAMPLES = 2048                 # sampled step lines for the coarse history of a big file
EMA_TAIL_BYTES = 2 << 20       # the last bytes parsed exactly for the EMA of a big file


@dataclass
class HistoryBuilder:
    """Folds (step, loss) pairs into a history and an EMA as the reducer does (the same
    :meth:`LossHistory.append` and :func:`ema_update`), without an event per step."""
    smoothing: float = DEFAULT_SMOOTHING
    history: LossHistory = field(default_factory=LossHistory)
    ema: float | None = None
    weight: float = 0.0
    skipped: int = 0

    def add(self, steps: Sequence[int], losses: Sequence[float]) -> None:
        s, ema, weight = self.smoothing, self.ema, self.weight
        append, isfinite, update = self.history.append, math.isfinite, ema_update
        for step, loss in zip(steps, losses):
            if not isfinite(loss):
                continue
            append(step, loss)
            ema, weight = update(ema, weight, loss, s)
        self.ema, self.weight = ema, weight

    def action(self, exact: bool = True) -> HistoryLoaded:
        return HistoryLoaded(self.history, self.ema, self.weight, self.skipped, exact)


@dataclass
class Snapshot:
    actions: list[Any]                 # engine events (in file order) then one HistoryLoaded
    offset: int                        # bytes read (complete lines only)
    run_started: RunStarted | None
    finished: RunFinished | None
    steps_start: int                   # where the last run's records begin
    exact: bool                        # False: the history is coarse; bytes [steps_start, offset) still to do


def load_snapshot(path: Path, *, exact_limit: int = EXACT_BYTES, smoothing: float = DEFAULT_SMOOTHING) -> Snapshot:
    """Everything the panels need from a run's events.jsonl, in time independent of its length
    (apart from byte searches and, for a file under ``exact_limit``, the exact history)."""
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return Snapshot([], 0, None, None, 0, True)
        with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as data:
            return _snapshot(data, size, exact_limit, smoothing)


_STEP = type_token(StepCompleted)
# Every record type but the two that stream (steps and memory samples): a new event type is found too.
_MARKERS = re.compile(type_token(*(k for k in EVENT_TYPES.values() if k not in (StepCompleted, MemorySample))))


def _snapshot(data, size: int, exact_limit: int, smoothing: float) -> Snapshot:
    end = data.rfind(b"\n") + 1               # complete lines only; the rest waits for the tail
    found: dict[int, Event] = {}

    # One forward pass finds the few records that are neither steps nor memory samples.
    pos = 0
    while True:
        m = _MARKERS.search(data, pos, end)
        if m is None:
            break
        start, raw = line_at(data, m.start(), end)
        event = parse_line(raw)
        if event is not None and not isinstance(event, (StepCompleted, MemorySample)):
            found[start] = event
        pos = start + len(raw) + 1
    starts = [k for k, e in found.items() if isinstance(e, RunStarted)]
    run_started = found[starts[-1]] if starts else None
    body = data.find(b"\n", starts[-1], end) + 1 if starts else 0

    def backward(token: bytes, kinds: tuple[type, ...], limit: int) -> None:
        pos, n = end, 0
        while n < limit:
            pos = data.rfind(token, body, pos)
            if pos < 0:
                return
            start, raw = line_at(data, pos, end)
            event = parse_line(raw)
            if isinstance(event, kinds):
                found[start] = event
                n += 1
            pos = start

    backward(type_token(MemorySample), (MemorySample,), MEMORY_HISTORY)
    backward(_STEP, (StepCompleted,), RATE_WINDOW)
    if run_started is None:                   # not written by a spyke engine we know: parse it all
        found = {i: e for i, e in enumerate(parse_line(r) for r in bytes(data[:end]).split(b"\n")) if e}

    # A resumed run appends a new start: the reducer starts over there (keeping only the log).
    events = [found[k] for k in sorted(found)]
    finished = next((found[k] for k in sorted(found, reverse=True) if k > (starts[-1] if starts else -1)
                     and isinstance(found[k], RunFinished)), None)
    exact = end - body <= exact_limit
    if exact:
        builder = HistoryBuilder(smoothing, skipped=bytes(data[body:end]).count(SKIPPED))
        builder.add(*step_losses(data, body, end))
        history = builder.action(exact=True)
    else:
        history = _coarse_history(data, body, end, smoothing)
    return Snapshot(events + [history], end, run_started, finished, body, exact)


def _coarse_history(data, body: int, end: int, smoothing: float) -> HistoryLoaded:
    """A first picture of a big run's loss: SAMPLES evenly spaced step lines, each standing
    for the steps since the previous sample; the EMA comes from the last EMA_TAIL_BYTES exactly."""
    steps, losses = [], []
    span = end - body
    for i in range(SAMPLES):
        pos = data.find(_STEP, body + span * i // SAMPLES, end)
        if pos < 0:
            break
        start, raw = line_at(data, pos, end)
        decoded = step_loss(raw)
        if decoded is None:
            continue
        step, loss = decoded
        if math.isfinite(loss) and (not steps or step > steps[-1]):
            steps.append(step)
            losses.append(loss)
    counts = [max(1, b - a) for a, b in zip([steps[0] - 1] + steps[:-1], steps)] if steps else []
    history = LossHistory.from_buckets(steps, [loss * n for loss, n in zip(losses, counts)], counts)
    tail_from = max(body, end - EMA_TAIL_BYTES)
    tail_from = data.find(b"\n", tail_from, end) + 1 if tail_from > body else body
    ema = HistoryBuilder(smoothing)
    ema.add(*step_losses(data, tail_from, end))
    return HistoryLoaded(history, ema.ema, ema.weight, 0, exact=False)
