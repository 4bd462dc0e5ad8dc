"""A viewer's hold on life: it ends on SIGTERM/SIGHUP within a second, and with whoever started it.

A viewer has nothing to save (the run is another process), so ending it is always safe. Two ways
it could outlive its use, both seen under ``spyke-cockpit serve``:

* a signal that waits on the app: Textual's web driver turns SIGTERM into a message for the event
  loop, which never gets it while the main thread is stuck writing a frame to a pipe nobody reads;
* a parent that has gone: the browser tab's process (``serve``) exited or was killed, and the viewer,
  adopted by init, keeps re-rendering into a closed pipe.

:class:`Lifeline` asks the app to exit and, should that take longer than :data:`EXIT_GRACE`, ends the
process from a thread (``os._exit``: no render, lock or blocked write can hold it). With
``watch_parent`` it also ends the viewer when its parent changes or its stdin (the pipe from serve)
hangs up, waiting on ``poll`` (no CPU while all is well).
"""

from __future__ import annotations

import os
import select
import signal
import stat
import threading
from typing import Any, Callable

EXIT_GRACE = 0.6          # seconds the app gets to close itself (restoring the terminal) before the hard exit
PARENT_POLL_MS = 500      # how often the parent watch looks at the parent pid (a hangup on stdin wakes it at once)


class Lifeline:
    """Install from the app's main thread once the app runs (its driver's own handlers are in place)."""

    def __init__(self, request_exit: Callable[[], None], *, grace: float = EXIT_GRACE,
                 hard_exit: Callable[[int], Any] = os._exit) -> None:
        self.request_exit = request_exit
        self.grace = grace
        self.hard_exit = hard_exit
        self.ending: str | None = None        # why the viewer is ending, once it is
        self._lock = threading.Lock()
        self._ppid = os.getppid()
        self._previous: dict[int, Any] = {}
        self._ended = threading.Event()

    def install(self, signals: tuple[int, ...] = (), *, watch_parent: bool = False) -> "Lifeline":
        """Handle ``signals`` (default SIGTERM, SIGHUP); with ``watch_parent``, end with the parent too."""
        wanted = signals or tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
        if threading.current_thread() is threading.main_thread():
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        if watch_parent:
            threading.Thread(target=self._watch, name="spyke-viewer-lifeline", daemon=True).start()
        return self

    # ------------------------------------------------------------------ the ways to end
    def end(self, reason: str) -> None:
        """Ask the app to exit now and make sure the process is gone ``grace`` seconds later."""
        with self._lock:
            if self.ending is not None:
                return
            self.ending = reason
        self._ended.set()
        timer = threading.Timer(self.grace, self.hard_exit, args=(0,))
        timer.daemon = True
        timer.start()
        threading.Thread(target=self._ask, name="spyke-viewer-exit", daemon=True).start()

    def finish(self) -> None:
        """The app has closed: end the process now (an interpreter's teardown after a Textual app is
        about a second of a core, and nothing is left to save)."""
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe or a gone terminal
                pass
        self.hard_exit(0)

    def _ask(self) -> None:
        try:
            self.request_exit()
        except Exception:  # noqa: BLE001 - the app is already closing: the timer ends the process
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum)
        if callable(previous):            # e.g. the hangup guard pointing stdio away from a dead terminal
            try:
                previous(signum, frame)
            except Exception:  # noqa: BLE001 - ending matters more
                pass
        self.end(signal.Signals(signum).name)

    # ------------------------------------------------------------------ the parent watch
    def parent_gone(self) -> bool:
        return os.getppid() != self._ppid

    def _watch(self) -> None:
        poller = _stdin_hangup_poller()
        while not self._ended.is_set():
            if poller is not None:
                if poller.poll(PARENT_POLL_MS):      # only POLLHUP/POLLERR: the writer (serve) is gone
                    self.end("stdin closed")
                    return
            elif self._ended.wait(PARENT_POLL_MS / 1000):
                return
            if self.parent_gone():
                self.end("parent exited")
                return


def _stdin_hangup_poller() -> Any:
    """A poll object that wakes only when stdin, a pipe, hangs up; None where that cannot be watched."""
    if not hasattr(select, "poll"):
        return None
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return None
        poller = select.poll()
        poller.register(0, 0)         # no events asked for: POLLHUP, POLLERR and POLLNVAL come anyway
    except (OSError, ValueError):
        return None
    return poller
