"""Surviving a dropped terminal (SSH disconnect, closed window): SIGHUP ends the UI, not the run.

When the terminal goes away the kernel sends SIGHUP. Ignoring it is not enough: Textual's
input thread would then spin at 100 % CPU reading end-of-file from the dead tty, and every
write to it fails. So :class:`HangupGuard`, on SIGHUP:

1. points fds 0/1/2 away from the dead tty at once (stdin to /dev/null; stdout and stderr
   to the run folder's ``console.log``, or /dev/null), so the app's last writes succeed;
2. asks the app to exit (thread-safe, wakes the event loop);

and after ``app.run()`` returns, :meth:`HangupGuard.detach` ignores further SIGHUPs, stops
buffering events for the gone UI and waits for the engine thread: the process trains to
the end, writing events and checkpoints, and exits when the run is over.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.api import CONSOLE_FILENAME

if TYPE_CHECKING:
    from cockpit.monitor import MonitorApp


class HangupGuard:
    def __init__(self, app: "MonitorApp") -> None:
        self.app = app
        self.hung_up = False
        self.hung_up_at: float | None = None
        self._previous: Any = None
        self._installed = False

    # ------------------------------------------------------------------ install
    def __enter__(self) -> "HangupGuard":
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_hangup)
            self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.hung_up:
            # Leaving the dead terminal: errors from writing to it are not the run's problem.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            return exc_type is not None and issubclass(exc_type, Exception)
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
        return False

    # ------------------------------------------------------------------ the signal
    def _on_hangup(self, signum: int, frame: Any) -> None:
        if self.hung_up:
            return
        self.hung_up = True
        self.hung_up_at = time.time()
        self.redirect_stdio(to_log=False)       # the app's last frames go nowhere, not into console.log
        app = self.app

        def ask_exit() -> None:
            try:
                app.call_from_thread(app.exit, 0)
            except Exception:  # noqa: BLE001 - the app is already closing
                pass

        threading.Thread(target=ask_exit, name="spyke-hangup", daemon=True).start()

    def console_path(self) -> Path | None:
        run_dir = self.app.source.run_dir
        return Path(run_dir) / CONSOLE_FILENAME if run_dir else None

    def redirect_stdio(self, to_log: bool = True) -> None:
        """fd 0 <- /dev/null; fds 1, 2 -> console.log of the run (append) when ``to_log``, else /dev/null."""
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            return
        out = null
        log = self.console_path() if to_log else None
        if log is not None:
            try:
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError:
                out = null
        for fd, target in ((0, null), (1, out), (2, out)):
            try:
                os.dup2(target, fd)
            except OSError:
                pass
        if out != null:
            os.close(out)
        os.close(null)
        if out != null:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            try:
                os.write(2, f"[{stamp}] terminal hung up (SIGHUP); the cockpit closed, training continues "
                            f"(pid {os.getpid()})\n".encode())
            except OSError:
                pass

    # ------------------------------------------------------------------ after the app
    def detach(self, wait: float | None = None) -> int:
        """Keep training without a terminal: returns 0 once the engine thread is done (or
        ``wait`` seconds passed), 1 if the run did not complete."""
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.redirect_stdio(to_log=True)
        app = self.app
        app.stop_buffering()                  # nobody will drain it any more
        source = app.source
        deadline = time.monotonic() + 60.0    # a start still in flight (torch import, model load)
        while app.starting and not source.running and time.monotonic() < deadline:
            time.sleep(0.2)
        finished = True
        unwatched = source.running and source.owns_run     # it ends with nobody in front of it
        if unwatched:
            finished = bool(source.wait(wait))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        if not finished:
            return 1
        if unwatched:
            self.notify_end()
        return 0 if source.outcome() in (None, "completed") else 1

    def notify_end(self) -> None:
        """Nobody watches any more: a desktop notification when the run this process trained ends."""
        source = self.app.source
        result, config = getattr(source, "result", None), getattr(source, "config", None)
        if result is None or config is None or config.no_notify:
            return
        from engine.api import notify_run_end

        run = result.run_dir.name if result.run_dir else config.output_name
        notify_run_end(result.status, result.global_step, result.error, run=run)
