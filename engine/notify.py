"""Telling someone that a run ended while nobody watched: the bell, terminal and desktop notifications.

Used where no screen shows the end: a headless run (in the foreground or detached) and a cockpit whose
terminal has gone. In a terminal (``out`` is a tty) it writes the bell and the OSC 9 (iTerm2, WezTerm,
Windows Terminal, kitty) and OSC 777 (urxvt, foot, Ghostty, VTE) notifications, which a terminal that
knows neither ignores. On a Linux desktop (``DISPLAY`` or ``WAYLAND_DISPLAY`` set) it runs
``notify-send``, on macOS ``osascript``. The commands are data (:func:`notification_commands`) so they
can be checked for any platform; running them never blocks for long and never fails the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Mapping, Sequence, TextIO

APP = "spyke-cockpit"
BELL = "\a"
COMMAND_TIMEOUT = 3.0        # seconds a notifier may take before it is left behind
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def run_end_text(status: str, step: int, error: str | None = None, run: str = "") -> tuple[str, str]:
    """The notification's title and body for a run that ended with ``status`` at ``step``."""
    name = f"run {run}" if run else "the run"
    if status == "completed":
        title, body = f"{name} finished", f"completed at step {step}"
    elif status == "aborted":
        title, body = f"{name} stopped", f"aborted at step {step}"
    elif error and "non-finite" in error:
        title, body = f"{name} hit a NaN", f"stopped at step {step}: {error}"
    else:
        title, body = f"{name} failed", f"at step {step}" + (f": {error}" if error else "")
    return f"{APP}: {title}", _clean(body)[:240]


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def terminal_sequences(title: str, body: str) -> str:
    """The bell, then OSC 9 and OSC 777 desktop notifications (each ended by BEL)."""
    title, body = (_clean(t).replace(";", ",") for t in (title, body))
    return f"{BELL}\x1b]9;{title}: {body}\a\x1b]777;notify;{title};{body}\a"


def _applescript_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def notification_commands(platform: str, env: Mapping[str, str], which: Callable[[str], str | None],
                          title: str, body: str) -> list[list[str]]:
    """The desktop notification commands for ``platform`` (``sys.platform``); [] where there is none."""
    title, body = _clean(title), _clean(body)
    if platform.startswith("linux") or platform.startswith("freebsd"):
        binary = which("notify-send")
        if binary and (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
            return [[binary, f"--app-name={APP}", title, body]]
    elif platform == "darwin":
        binary = which("osascript")
        if binary:
            script = f"display notification {_applescript_string(body)} with title {_applescript_string(title)}"
            return [[binary, "-e", script]]
    return []


def run_quietly(command: Sequence[str]) -> None:
    """Run a notifier: no input, no output, at most COMMAND_TIMEOUT seconds, errors ignored."""
    try:
        subprocess.run(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def notify_run_end(status: str, step: int, error: str | None = None, *, run: str = "", out: TextIO | None = None,
                   platform: str = sys.platform, env: Mapping[str, str] | None = None,
                   which: Callable[[str], str | None] = shutil.which,
                   spawn: Callable[[Sequence[str]], None] = run_quietly) -> list[list[str]]:
    """Ring and notify that the run ended; returns the desktop commands it ran."""
    title, body = run_end_text(status, step, error, run)
    if out is not None:
        try:
            if out.isatty():
                out.write(terminal_sequences(title, body))
                out.flush()
        except (OSError, ValueError):        # a closed or gone terminal
            pass
    commands = notification_commands(platform, os.environ if env is None else env, which, title, body)
    for command in commands:
        spawn(command)
    return commands
