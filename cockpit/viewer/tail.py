"""The event source of a viewer: a run folder's journal instead of the engine.

A :class:`TailSource` is an :class:`cockpit.sources.EventSource` that reads
``<run_dir>/events.jsonl``: first the whole file at once (a snapshot, :mod:`cockpit.viewer.snapshot`),
then the lines appended since, on a timer. Commands go to the run through its control channel
(owner-only command files, see ``engine.run.channel``), so any number of viewers can watch and
steer the same run, from any terminal, while the run itself knows nothing about them.
"""

from __future__ import annotations

import getpass
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cockpit.viewer.prefetch import SnapshotPrefetch
from cockpit.viewer.snapshot import EXACT_BYTES, HistoryBuilder, load_snapshot
from engine.api import (CONTROL_DIRNAME, EVENTS_FILENAME as EVENTS, SKIPPED, Command, Commands, EventTail, LogMessage,
                        RunFinished, RunStarted, SpykeError, StepCompleted, send_command, step_losses)
from engine.api import pid_alive as default_pid_alive

POLL_INTERVAL = 0.3            # seconds between tail reads (≈3 Hz)
PID_CHECK_INTERVAL = 2.0       # seconds between checks that the run's process still lives
EXACT_CHUNK = 1 << 20          # bytes the tail thread turns into exact history per slice
EXACT_DELAY = 1.0              # seconds the exact history waits, so the first screen paints first
EXACT_PAUSE = 0.01             # pause between slices, so the UI thread gets the GIL

Deliver = Callable[[Any], None]


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


class TailSource(Commands):
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
        self._pid_alive = pid_alive or default_pid_alive
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
        self._tail = EventTail(self.path, snap.offset)
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


    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return self._deliver is not None and not self._done.is_set()

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir

    owns_run = False                 # the run is another process's: a viewer never waits for it

    def outcome(self) -> str | None:
        return None if self.finished is None else self.finished.status

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

    def submit(self, command: Command) -> None:
        refusal = self.control_refusal()
        if refusal:
            raise SpykeError(refusal)
        try:
            send_command(self._run_dir, command, sender=self.sender)
        except OSError as err:
            raise SpykeError(f"{self._run_dir / CONTROL_DIRNAME}: cannot send {command.value} "
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
            self._tail = EventTail(self.path, snap.offset)
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
                builder.skipped += bytes(data[pos:stop]).count(SKIPPED)
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
