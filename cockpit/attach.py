"""``spyke-cockpit attach [RUN] [--read-only] [--root DIR]``: the cockpit on a run folder.

A :class:`TailSource` is an :class:`cockpit.sources.EventSource` that, instead of running the
engine, reads ``<run_dir>/events.jsonl``: first the whole file at once (a snapshot), then
the lines appended since, on a timer. Commands go to the run through its control channel
(owner-only command files, see ``engine.run.channel``), so any number of viewers can watch and
steer the same run, from any terminal, while the run itself knows nothing about them.

Loading a long run fast: a run of 1,000,000 steps writes ~170 MB of step records. The
snapshot does not parse them one by one. It finds the few records the panels need (run
start, phases, checkpoints, log lines, the last memory samples, the last steps) with
byte searches from either end of the file, and rebuilds the loss history separately:
exactly when the file is small, otherwise as a coarse picture from a few thousand sampled
lines that the tail thread then replaces with the exact history, chunk by chunk.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import mmap
import os
import pickle
import re
import select
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cockpit.pace import BUSY_FACTOR, BUSY_POLL, IdleCpu, ViewerPace
from cockpit.state import DEFAULT_SMOOTHING, MEMORY_HISTORY, RATE_WINDOW, HistoryLoaded, LossHistory
from engine.control import Command
from engine.errors import SpykeError
from engine.events import (Event, LogMessage, MemorySample, RunFinished, RunStarted,
                           StepCompleted, event_from_dict)

EVENTS = "events.jsonl"
POLL_INTERVAL = 0.3            # seconds between tail reads (≈3 Hz)
PID_CHECK_INTERVAL = 2.0       # seconds between checks that the run's process still lives
EXACT_BYTES = 4 << 20          # below this many bytes of records the snapshot history is exact at once
EXACT_CHUNK = 1 << 20          # bytes the tail thread turns into exact history per slice
EXACT_DELAY = 1.0              # seconds the exact history waits, so the first screen paints first
EXACT_PAUSE = 0.01             # pause between slices, so the UI thread gets the GIL
SAMPLES = 2048                 # sampled step lines for the coarse history of a big file
EMA_TAIL_BYTES = 2 << 20       # the last bytes parsed exactly for the EMA of a big file
VIEW_INTERVAL = 2.0            # a viewer redraws its panels every 2 s (--refresh; the live cockpit: 4 Hz)
PLOT_EVERY = 4                 # and its loss chart, the costly panel, every 4th redraw while the run is live
REFRESH_RANGE = (0.25, 60.0)   # what --refresh accepts, in seconds

Deliver = Callable[[Any], None]

_STEP_RE = re.compile(rb'"type":"step","t":[^,]*,"step":(-?\d+),"epoch":-?\d+,"loss":([^,}]*)')
_EVENT_START = b'{"v":'
_SKIPPED = b'"skipped":true'


# ---------------------------------------------------------------- parsing
def parse_record(raw: bytes) -> Event | None:
    """One JSONL record; a line glued to a torn earlier one (a crash mid-write) still parses."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        return event_from_dict(json.loads(raw))
    except (ValueError, AttributeError):
        pass
    cut = raw.rfind(_EVENT_START)
    if cut > 0:
        return parse_record(raw[cut:])
    return None


class FileTail:
    """Incremental reader of a growing events.jsonl: keeps its offset, leaves a half-written
    last line for the next read, and starts over (``truncated`` becomes True) when the file
    shrinks or is replaced."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""
        self._ident: tuple[int, int] | None = None
        self.truncated = False

    def read(self, max_bytes: int | None = None) -> list[Event]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                ident = (st.st_dev, st.st_ino)
                if self._ident is None:
                    self._ident = ident
                if ident != self._ident or st.st_size < self.offset:
                    self._ident, self.offset, self._partial = ident, 0, b""
                    self.truncated = True
                if st.st_size == self.offset:
                    return []
                fh.seek(self.offset)
                chunk = fh.read() if max_bytes is None else fh.read(max_bytes)
        except OSError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [e for e in map(parse_record, lines) if e is not None]


def _line_at(data, pos: int, end: int) -> tuple[int, bytes]:
    start = data.rfind(b"\n", 0, pos) + 1
    stop = data.find(b"\n", pos, end)
    stop = end if stop < 0 else stop
    return start, bytes(data[start:stop])


def step_losses(data, start: int, end: int) -> tuple[list[int], list[float]]:
    """(step, loss) of every step record in ``data[start:end]`` without building events."""
    pairs = _STEP_RE.findall(data, start, end)
    return [int(s) for s, _ in pairs], [_float(v) for _, v in pairs]


def _float(raw: bytes) -> float:
    try:
        return float(raw)
    except ValueError:
        return math.nan


@dataclass
class HistoryBuilder:
    """Folds (step, loss) pairs exactly as the reducer does (same appends, same EMA arithmetic)."""
    smoothing: float = DEFAULT_SMOOTHING
    history: LossHistory = field(default_factory=LossHistory)
    ema: float | None = None
    weight: float = 0.0
    skipped: int = 0

    def add(self, steps: Sequence[int], losses: Sequence[float]) -> None:
        history, s = self.history, self.smoothing
        ema, weight = self.ema, self.weight
        append, isfinite = history.append, math.isfinite
        for step, loss in zip(steps, losses):
            if not isfinite(loss):
                continue
            append(step, loss)
            acc = (ema or 0.0) * weight * s + (1 - s) * loss
            weight = weight * s + (1 - s)
            ema = acc / weight if weight > 0 else loss
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


_MARKERS = re.compile(rb'"type":"(?:run_started|phase|checkpoint|log|finished)"')


def _snapshot(data, size: int, exact_limit: int, smoothing: float) -> Snapshot:
    end = data.rfind(b"\n") + 1               # complete lines only; the rest waits for the tail
    found: dict[int, Event] = {}

    # One forward pass finds the few records that are neither steps nor memory samples.
    pos = 0
    while True:
        m = _MARKERS.search(data, pos, end)
        if m is None:
            break
        start, raw = _line_at(data, m.start(), end)
        event = parse_record(raw)
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
            start, raw = _line_at(data, pos, end)
            event = parse_record(raw)
            if isinstance(event, kinds):
                found[start] = event
                n += 1
            pos = start

    backward(b'"type":"memory"', (MemorySample,), MEMORY_HISTORY)
    backward(b'"type":"step"', (StepCompleted,), RATE_WINDOW)
    if run_started is None:                   # not written by a spyke engine we know: parse it all
        found = {i: e for i, e in enumerate(parse_record(r) for r in bytes(data[:end]).split(b"\n")) if e}

    # A resumed run appends a new start: the reducer starts over there (keeping only the log).
    events = [found[k] for k in sorted(found)]
    finished = next((found[k] for k in sorted(found, reverse=True) if k > (starts[-1] if starts else -1)
                     and isinstance(found[k], RunFinished)), None)
    builder = HistoryBuilder(smoothing)
    exact = end - body <= exact_limit
    if exact:
        builder.skipped = bytes(data[body:end]).count(_SKIPPED)
        builder.add(*step_losses(data, body, end))
    else:
        _coarse_history(data, body, end, builder)
    return Snapshot(events + [builder.action(exact)], end, run_started, finished, body, exact)


def _coarse_history(data, body: int, end: int, builder: HistoryBuilder) -> None:
    """A first picture of a big run's loss: SAMPLES evenly spaced step lines, each standing
    for the steps since the previous sample; the EMA comes from the last EMA_TAIL_BYTES exactly."""
    steps, losses = [], []
    span = end - body
    for i in range(SAMPLES):
        pos = data.find(b'"type":"step"', body + span * i // SAMPLES, end)
        if pos < 0:
            break
        start, raw = _line_at(data, pos, end)
        m = _STEP_RE.search(raw)
        if m is None:
            continue
        step, loss = int(m.group(1)), _float(m.group(2))
        if math.isfinite(loss) and (not steps or step > steps[-1]):
            steps.append(step)
            losses.append(loss)
    history = builder.history
    if steps:
        counts = [max(1, b - a) for a, b in zip([steps[0] - 1] + steps[:-1], steps)]
        history.steps = steps
        history.counts = counts
        history.sums = [loss * n for loss, n in zip(losses, counts)]
        history.total = sum(counts)
        bucket = 1
        while bucket * history.capacity < history.total:
            bucket *= 2
        history.bucket_size = max(bucket, max(counts))
    tail_from = max(body, end - EMA_TAIL_BYTES)
    tail_from = data.find(b"\n", tail_from, end) + 1 if tail_from > body else body
    ema = HistoryBuilder(builder.smoothing)
    ema.add(*step_losses(data, tail_from, end))
    builder.ema, builder.weight = ema.ema, ema.weight


# ---------------------------------------------------------------- prefetch
class SnapshotPrefetch:
    """Loads the snapshot in a forked child while this process imports Textual and starts the app.

    The snapshot of a long run is ~0.15-0.3 s of byte searches that hold the GIL, and starting
    the app is ~0.5 s of imports and set-up that hold it too; a child process on another core
    does the first while this one does the second. Made before Textual is imported, so the
    child is a small, thread-free interpreter; it returns the pickled Snapshot through a private
    pipe and exits. Where fork is missing or anything goes wrong, :meth:`result` returns None
    and the caller loads the snapshot itself.
    """

    def __init__(self, path: Path, *, exact_limit: int = EXACT_BYTES) -> None:
        self.path = Path(path)
        self.exact_limit = exact_limit
        self._pid: int | None = None
        self._fd: int | None = None
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return                      # forking a threaded process is unsafe: load in process instead
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return
        if pid == 0:                    # the child: never returns into the caller's code
            code = 1
            try:
                os.close(read_fd)
                payload = pickle.dumps(load_snapshot(self.path, exact_limit=exact_limit),
                                       protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(payload)
                while view:
                    view = view[os.write(write_fd, view):]
                code = 0
            except BaseException:       # noqa: BLE001 - the parent falls back to loading it itself
                pass
            finally:
                os._exit(code)
        os.close(write_fd)
        self._pid, self._fd = pid, read_fd

    def ready(self, timeout: float = 0.0) -> bool:
        """True when :meth:`result` will not wait for the child (its answer, or its end, has arrived)."""
        if self._fd is None:
            return False
        try:
            return bool(select.select([self._fd], [], [], timeout)[0])
        except (OSError, ValueError):
            return False

    def result(self) -> Snapshot | None:
        """The child's snapshot (waiting for it), or None when there is none to be had."""
        if self._fd is None:
            return None
        chunks = []
        try:
            while True:
                chunk = os.read(self._fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            chunks = []
        finally:
            self.close()
        try:
            snap = pickle.loads(b"".join(chunks)) if chunks else None
        except Exception:  # noqa: BLE001 - a torn payload: load it in process
            return None
        return snap if isinstance(snap, Snapshot) else None

    def close(self) -> None:
        """Drop the child (a viewer that exits before using it): it sees a closed pipe and exits."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pid is not None:
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
            self._pid = None


# ---------------------------------------------------------------- the source
def _sender() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    try:
        tty = os.ttyname(0)
    except OSError:
        tty = "no tty"
    return f"attach {user} ({tty}, pid {os.getpid()})"


class TailSource:
    """An EventSource over a run folder: snapshot, then tail; commands through the control channel."""

    def __init__(self, run_dir: Path, *, read_only: bool = False, poll_interval: float = POLL_INTERVAL,
                 exact_limit: int = EXACT_BYTES, exact_delay: float = EXACT_DELAY, pid_alive: Callable[[int | None, float | None], bool] | None = None,
                 sender: str | None = None, prefetch: SnapshotPrefetch | None = None) -> None:
        self._run_dir = Path(run_dir)
        self._prefetch = prefetch
        self.path = self._run_dir / EVENTS
        self.read_only = read_only
        self.poll_interval = poll_interval
        self.exact_limit = exact_limit
        self.exact_delay = exact_delay
        self.sender = sender or _sender()
        if pid_alive is None:
            from engine.runs import pid_alive
        self._pid_alive = pid_alive
        self._deliver: Deliver | None = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.run_started: RunStarted | None = None
        self.finished: RunFinished | None = None
        self.stale = False
        self.snapshot_seconds: float | None = None
        self.history_exact = threading.Event()
        self._late: list[tuple[int, float]] = []      # steps tailed while the exact history is built
        self._late_skipped = 0

    # -------------------------------------------------------------- EventSource
    def start(self, config: Any, deliver: Deliver) -> None:
        if not self.path.is_file():
            raise SpykeError(f"{self._run_dir}: no {EVENTS} here; pass a run folder (see `spyke-cockpit ls`)")
        self._deliver = deliver
        t0 = time.perf_counter()
        prefetch, self._prefetch = self._prefetch, None
        snap = None
        if prefetch is not None:            # one made for another exact_limit would give another history
            snap = prefetch.result() if prefetch.exact_limit == self.exact_limit else prefetch.close()
        if snap is None:
            snap = load_snapshot(self.path, exact_limit=self.exact_limit)
        self.snapshot_seconds = time.perf_counter() - t0
        self.run_started, self.finished = snap.run_started, snap.finished
        for action in snap.actions:
            deliver(action)
        if snap.exact:
            self.history_exact.set()
        self._tail = FileTail(self.path, snap.offset)
        pending = None if snap.exact else (snap.steps_start, snap.offset)
        if self.finished is None and not self._alive():
            self._mark_stale()
        if self.finished is not None or self.stale:
            if pending is not None:              # history only: no tail needed, just the exact history
                self._thread = threading.Thread(target=self._exact_only, args=(pending,), daemon=True,
                                                name="spyke-attach-history")
                self._thread.start()
            else:
                self._done.set()
            return
        self._thread = threading.Thread(target=self._loop, args=(pending,), daemon=True, name="spyke-attach-tail")
        self._thread.start()

    def snapshot_ready(self) -> bool:
        """True when a prefetched snapshot is waiting, so :meth:`start` returns at once."""
        return self._prefetch is not None and self._prefetch.ready()

    def pause(self) -> None:
        self._send(Command.PAUSE)

    def resume(self) -> None:
        self._send(Command.RESUME)

    def save(self) -> None:
        self._send(Command.SAVE)

    def abort(self, save: bool) -> None:
        self._send(Command.ABORT if save else Command.ABORT_NO_SAVE)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return self._deliver is not None and not self._done.is_set()

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir

    def stop(self) -> None:
        """Stop tailing (the viewer is closing); the run itself is not touched."""
        self._stop.set()
        if self._prefetch is not None:
            self._prefetch.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    # -------------------------------------------------------------- control
    @property
    def run_label(self) -> str:
        return self.run_started.run_id if self.run_started else self._run_dir.name

    def control_refusal(self) -> str | None:
        """Why this viewer cannot steer the run, or None when it can."""
        if self.read_only:
            return "read-only viewer: commands are not sent (attach without --read-only to steer the run)"
        if self.finished is not None:
            return f"run {self.run_label} is not running (it {self.finished.status.replace('completed', 'finished')})"
        if self.stale or not self._alive():
            return f"run {self.run_label} is not running (its process is gone)"
        return None

    def _send(self, command: Command) -> None:
        refusal = self.control_refusal()
        if refusal:
            raise SpykeError(refusal)
        from engine.run.channel import send_command

        try:
            send_command(self._run_dir, command, sender=self.sender)
        except OSError as err:
            raise SpykeError(f"{self._run_dir / 'control'}: cannot send {command.value} "
                             f"({err.strerror or err}); only the run's owner can steer it") from None

    # -------------------------------------------------------------- internals
    def _alive(self) -> bool:
        rs = self.run_started
        if rs is None:
            return True                          # starting up: no pid written yet
        return self._pid_alive(rs.pid, rs.t)

    def _mark_stale(self) -> None:
        self.stale = True
        rs = self.run_started
        pid = f" (pid {rs.pid})" if rs else ""
        self._emit(RunFinished(status="failed", step=0,
                               error=f"run {self.run_label} is not running: its process{pid} ended without a "
                                     "finish record (stale); shown as history"))

    def _emit(self, event: Any) -> None:
        if self._deliver is not None:
            self._deliver(event)

    def _read_tail(self) -> None:
        events = self._tail.read()
        if self._tail.truncated:
            self._tail.truncated = False
            self._emit(LogMessage(level="warning", message=f"{self.path} was truncated or replaced; reloading it"))
            snap = load_snapshot(self.path, exact_limit=1 << 62)
            self.run_started, self.finished = snap.run_started, snap.finished
            self._tail = FileTail(self.path, snap.offset)
            self._late.clear()
            for action in snap.actions:
                self._emit(action)
            return
        for event in events:
            if isinstance(event, StepCompleted) and not self.history_exact.is_set():
                self._late.append((event.step, event.loss))
                self._late_skipped += event.skipped
            elif isinstance(event, RunStarted):
                self.run_started = event
            elif isinstance(event, RunFinished):
                self.finished = event
            self._emit(event)

    def _exact_history(self, span: tuple[int, int], between: Callable[[], None]) -> None:
        start, end = span
        if self._stop.wait(self.exact_delay):
            return
        builder = HistoryBuilder()
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), end, access=mmap.ACCESS_READ) as data:
            pos = start
            while pos < end and not self._stop.is_set():
                stop = data.find(b"\n", min(end, pos + EXACT_CHUNK) - 1, end) + 1 or end
                builder.add(*step_losses(data, pos, stop))
                builder.skipped += bytes(data[pos:stop]).count(_SKIPPED)
                pos = stop
                between()
                time.sleep(EXACT_PAUSE)
        if self._stop.is_set():
            return
        late = self._late
        builder.add([s for s, _ in late], [v for _, v in late])
        builder.skipped += self._late_skipped
        self._emit(builder.action(exact=True))
        self.history_exact.set()

    def _exact_only(self, span: tuple[int, int]) -> None:
        try:
            self._exact_history(span, lambda: None)
        finally:
            self._done.set()

    def _loop(self, pending: tuple[int, int] | None) -> None:
        last_pid_check = time.monotonic()
        try:
            if pending is not None:
                self._exact_history(pending, self._read_tail)
            self._late = []
            while not self._stop.wait(self.poll_interval):
                self._read_tail()
                if self.finished is not None:
                    break
                now = time.monotonic()
                if now - last_pid_check >= PID_CHECK_INTERVAL:
                    last_pid_check = now
                    if not self._alive():
                        self._read_tail()        # the finish record may have landed just before exit
                        if self.finished is None:
                            self._mark_stale()
                        break
        finally:
            self._done.set()


# ---------------------------------------------------------------- finding the run
def resolve_run(run: str | None, root: str | None = None) -> Path:
    """A run folder from what the user typed: a run folder, its events.jsonl, a folder holding
    runs (the most recent live one is picked), or a run id under ``root`` (default: the runs root
    from $SPYKE_RUNS_ROOT or the user config file, else the current folder)."""
    from engine.runs import default_runs_root, find_run_dirs, latest_live_run

    base = Path(root) if root else default_runs_root()
    if run is None:
        info = latest_live_run(base)
        if info is None:
            raise SpykeError(f"no runs under {base.resolve()}; pass a run folder, or --root DIR "
                             "(start one with `spyke-cockpit train --detach CONFIG`)")
        return info.run_dir
    path = Path(run).expanduser()
    if path.name == EVENTS and path.is_file():
        return path.parent
    if path.is_dir():
        if (path / EVENTS).is_file():
            return path
        info = latest_live_run(path)
        if info is None:
            raise SpykeError(f"{path}: no spyke-cockpit runs in this folder (see `spyke-cockpit ls {path}`)")
        return info.run_dir
    matches = [d for d in find_run_dirs(base) if d.name == run or d.name.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SpykeError(f"run '{run}' matches {len(matches)} runs under {base.resolve()}; pass its folder")
    raise SpykeError(f"run '{run}': no such run folder or run id under {base.resolve()} "
                     "(see `spyke-cockpit ls`, or pass --root DIR)")


# ---------------------------------------------------------------- the app
def _attach_app_class():
    from textual import events as tevents
    from textual.app import ComposeResult
    from textual.containers import Horizontal, Vertical
    from textual.css.query import NoMatches
    from textual.widgets import Footer, Header

    from cockpit.app import CockpitApp
    from cockpit.panels import CheckpointsPanel, LogPanel, LossPanel, MemoryPanel, ProgressPanel, compose_live_panels

    class AttachApp(CockpitApp):
        """The cockpit's live panels on a TailSource: no form, no Start; quitting leaves the run running."""

        CONTROL_KEYS = ("space", "p", "s", "a", "ctrl+x")

        def __init__(self, source: TailSource, *, read_only: bool = False, refresh: float = VIEW_INTERVAL,
                     idle_cpu: Callable[[], float | None] | None = None, **kwargs: Any) -> None:
            super().__init__(source, **kwargs)
            self.read_only = read_only
            self.pace = ViewerPace(refresh)
            self._idle_cpu = idle_cpu
            self._base_poll = source.poll_interval
            self._set_sub_title()

        @property
        def refresh_seconds(self) -> float:
            """Seconds between redraws now: --refresh, or BUSY_FACTOR times that while the CPU is busy."""
            return self.pace.interval

        def _set_sub_title(self) -> None:
            # the busy note first: a long run path is what the header cuts off on a narrow terminal
            busy = self.pace.label()
            parts = ([busy] if busy else []) + [f"attach {self.source.run_dir}"]
            self.sub_title = " · ".join(parts + (["read-only"] if self.read_only else []))

        def compose(self) -> ComposeResult:
            yield Header(show_clock=False)
            with Horizontal(id="main"):
                with Vertical(id="right"):
                    yield from compose_live_panels()
            yield Footer()

        def on_mount(self, event: tevents.Mount) -> None:
            event.prevent_default()              # the base mount wires up the form, which attach has not
            main = self.screen
            self.panels = (main.query_one(ProgressPanel), main.query_one(LossPanel), main.query_one(MemoryPanel),
                           main.query_one(CheckpointsPanel), main.query_one(LogPanel))
            self._plot_panel = main.query_one(LossPanel)
            self._plot_drawn_at = -1e9
            self._bindings_key = None
            if self._idle_cpu is None:       # psutil loads after the first frame, not before it
                self.call_after_refresh(self._start_idle_meter)
            self._arm()
            self._render_state()
            self._start_in_flight = True
            self.commands_log.append("attach")
            if self.source.snapshot_ready():
                # the prefetched snapshot has arrived: fold it in now, so the first frame is the full one
                # (one chart render instead of an empty one and then the full one, no worker round trip)
                if self._start_source(None):
                    self._drain()
            else:
                self._start_engine(None)

        def _arm(self) -> None:
            self.set_timer(self.pace.interval, self._tick)

        def _start_idle_meter(self) -> None:
            if self._idle_cpu is None:
                self._idle_cpu = IdleCpu()

        def _tick(self) -> None:
            """One redraw; first, whether the box had idle CPU since the last one sets the next pace."""
            if self._idle_cpu is not None and self.pace.observe(self._idle_cpu()):
                self.source.poll_interval = max(self._base_poll, BUSY_POLL) if self.pace.busy else self._base_poll
                self._set_sub_title()
            self._drain()
            self._arm()

        def _run_status_changed(self) -> None:
            self.refresh_bindings()

        def _render_state(self) -> None:
            """Like the cockpit's, but cheaper for a viewer on a run that logs many steps a second:
            the chart redraws every PLOT_EVERY refreshes (at once when the run's status changes) and the
            footer only when what the keys can do changes. On a box the training saturates, a viewer's
            CPU comes out of the training's, hence this pacing and cockpit.pace (figures in bench/README.md)."""
            now = self.clock()
            state = self.state
            key = (state.status, state.running, state.paused, state.pause_requested, state.abort_requested)
            plot_due = (now - self._plot_drawn_at >= PLOT_EVERY * self.refresh_seconds or key != self._bindings_key
                        or not state.running)
            for panel in self.panels:
                if panel is self._plot_panel:
                    if not plot_due:
                        continue
                    self._plot_drawn_at = now
                try:
                    panel.show(state, now)
                except NoMatches:      # still composing, or torn down while the viewer exits
                    continue
            if key != self._bindings_key:
                self._bindings_key = key
                self.refresh_bindings()

        def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
            if action in ("start", "save_toml"):
                return False
            if action in ("toggle_pause", "save_now", "abort") and self.read_only:
                return None
            return super().check_action(action, parameters)

        def on_key(self, event: tevents.Key) -> None:
            if event.key in self.CONTROL_KEYS:
                refusal = self.source.control_refusal() if self.read_only or not self.state.running else None
                if refusal:
                    self.notify(refusal, severity="warning", timeout=4)

        def _send(self, do: Callable[[], None]) -> None:
            try:
                do()
            except SpykeError as err:
                self.notify(str(err), severity="error", timeout=6)

        def action_toggle_pause(self) -> None:
            self._send(super().action_toggle_pause)

        def action_save_now(self) -> None:
            self._send(super().action_save_now)

        def _abort_chosen(self, choice: str | None, *, quit_after: bool) -> None:
            self._send(lambda: super(AttachApp, self)._abort_chosen(choice, quit_after=False))

        def action_quit_cockpit(self) -> None:
            self.source.stop()
            self.exit(0)

    return AttachApp


def make_app(run_dir: Path, *, read_only: bool = False, prefetch: bool = False, **kwargs: Any):
    # the prefetch forks before Textual is imported (by the app class below)
    snapshot = SnapshotPrefetch(Path(run_dir) / EVENTS) if prefetch and (Path(run_dir) / EVENTS).is_file() else None
    source = TailSource(run_dir, read_only=read_only, prefetch=snapshot)
    return _attach_app_class()(source, read_only=read_only, **kwargs)


def _refresh_seconds(text: str) -> float:
    low, high = REFRESH_RANGE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds from {low:g} to {high:g}")
    return value


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spyke-cockpit attach",
        description="Watch and steer a training run from its run folder (any terminal, any number of viewers).")
    parser.add_argument("run", nargs="?", help="run folder, its events.jsonl, a folder of runs, or a run id "
                                               "(default: the most recent live run under --root)")
    parser.add_argument("--read-only", action="store_true", help="watch only: pause/save/abort are refused")
    parser.add_argument("--refresh", type=_refresh_seconds, default=VIEW_INTERVAL, metavar="SECONDS",
                        help=f"seconds between redraws (default {VIEW_INTERVAL:g}; the chart every {PLOT_EVERY}th; "
                             f"{BUSY_FACTOR}x slower while less than half a CPU core is idle, leaving the CPU to the "
                             "training); keys act at once, pause, checkpoints and the finish show within a second")
    parser.add_argument("--root", help="where to look for runs (default: $SPYKE_RUNS_ROOT, else runs_root in "
                                       "~/.config/spyke-cockpit/config.toml, else the current folder)")
    ns = parser.parse_args(list(argv))
    run_dir = resolve_run(ns.run, ns.root)
    app = make_app(run_dir, read_only=ns.read_only, prefetch=True, refresh=ns.refresh)
    from cockpit.hangup import HangupGuard

    guard = HangupGuard(app)
    with guard:
        result = app.run()
    app.source.stop()
    if guard.hung_up:
        guard.detach(wait=None)
        return 0
    return int(result or 0)
