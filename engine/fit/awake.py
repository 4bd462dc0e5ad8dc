"""Keep a Mac awake while a run trains: ``caffeinate -i -w <pid>`` (idle sleep is held off until
the process ``pid`` ends, so a crashed run never leaves the Mac awake for good).

Call sites: ``engine.headless.run_headless`` (foreground and detached runs) and
``engine.session.start_training`` (the cockpit), each through :func:`keep_awake`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


def caffeinate_command(pid: int | None = None, *, no_prevent_sleep: bool = False, platform: str | None = None,
                       which: Callable[[str], str | None] = shutil.which) -> list[str] | None:
    """The command that keeps this Mac awake while ``pid`` lives; None off macOS, without the
    ``caffeinate`` binary, or with ``--no_prevent_sleep``."""
    platform = sys.platform if platform is None else platform
    if no_prevent_sleep or platform != "darwin":
        return None
    binary = which("caffeinate")
    if not binary:
        return None
    return [binary, "-i", "-w", str(os.getpid() if pid is None else pid)]


def start_keep_awake(no_prevent_sleep: bool = False, *, pid: int | None = None,
                     popen: Callable[..., subprocess.Popen] = subprocess.Popen, **kwargs) -> subprocess.Popen | None:
    """Start caffeinate (the hook the run's starters call); None when nothing is started."""
    command = caffeinate_command(pid, no_prevent_sleep=no_prevent_sleep, **kwargs)
    if command is None:
        return None
    try:
        return popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def stop_keep_awake(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def keep_awake(no_prevent_sleep: bool = False, **kwargs) -> Iterator[subprocess.Popen | None]:
    """While the block runs (a training run), the Mac does not idle-sleep."""
    proc = start_keep_awake(no_prevent_sleep, **kwargs)
    try:
        yield proc
    finally:
        stop_keep_awake(proc)
