"""A real terminal for tests: one private tmux server per test, driven by keys and read by screen captures.

Each test gets a server of its own (its own socket), so no test can connect to a server that the test before it
is still shutting down ("server exited unexpectedly"), and no other session can resize its window.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

BIN = Path(sys.executable).with_name("spyke-cockpit")
STEP = re.compile(r"step (\d+)/(\d+)")
HAVE_TMUX = shutil.which("tmux") is not None and BIN.exists()


def step_of(text: str) -> int:
    m = STEP.search(text)
    return int(m.group(1)) if m else -1


class Term:
    """One tmux server holding one 120×40 session that runs `cmd`."""

    def __init__(self, cmd: str, width: int = 120, height: int = 40):
        self.socket = f"spyke-test-{uuid.uuid4().hex[:12]}"
        self.session = "main"
        self.tmux("new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height), cmd)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")

    def close(self) -> None:
        """A cockpit that loses its terminal keeps training by design: end it with the test."""
        panes = subprocess.run(["tmux", "-L", self.socket, "list-panes", "-a", "-F", "#{pane_pid}"],
                               capture_output=True, text=True).stdout.split()
        children = []
        for pid in panes:
            try:
                children += psutil.Process(int(pid)).children(recursive=True)
            except psutil.Error:
                pass
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
