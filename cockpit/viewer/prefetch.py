"""Loading a run's snapshot in a forked child while this process starts the app."""

from __future__ import annotations

import os
import pickle
import select
import threading
from pathlib import Path

from cockpit.viewer.snapshot import EXACT_BYTES, Snapshot, load_snapshot


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
