"""End to end in a real terminal: tmux runs `spyke-cockpit demo` at 120×40 and a script drives it by keys."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).with_name("spyke-cockpit")
STEP = re.compile(r"step (\d+)/(\d+)")


SOCKET = f"spyke-test-{os.getpid()}"     # a private tmux server: no other session can resize the window


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_for(session: str, predicate, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen(session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")


def step_of(text: str) -> int:
    m = STEP.search(text)
    return int(m.group(1)) if m else -1


@pytest.mark.skipif(shutil.which("tmux") is None or not BIN.exists(), reason="needs tmux and the console script")
def test_demo_in_tmux_pause_save_abort_quit(tmp_path):
    session = f"spyke-{uuid.uuid4().hex[:8]}"
    exit_file = tmp_path / "exit_code"
    # the demo's model/dataset cache is the user's default one (built once, reused across runs)
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && {BIN} demo; echo $? > {exit_file}; sleep 30"
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd)
    try:
        wait_for(session, lambda t: "spyke_demo-step" in t, 60, "the demo form and its preview")
        tmux("send-keys", "-t", session, "C-r")
        wait_for(session, lambda t: step_of(t) >= 3, 120, "training steps")

        tmux("send-keys", "-t", session, "space")
        text = wait_for(session, lambda t: "PAUSED" in t and "halting" not in t, 20, "PAUSED")
        first = step_of(text)
        time.sleep(1.5)
        assert step_of(screen(session)) == first, "the step count moved while paused"

        tmux("send-keys", "-t", session, "space")
        wait_for(session, lambda t: step_of(t) > first and "PAUSED" not in t, 30, "steps after resume")

        tmux("send-keys", "-t", session, "s")
        text = wait_for(session, lambda t: re.search(r"spyke_demo-step\d{8}\.safetensors\s+\d", t), 30,
                        "a checkpoint row")
        out_root = tmp_path / "spyke-demo-output"
        assert list(out_root.glob("*/spyke_demo-step*.safetensors")), "manual save wrote no file"
        saved_before = {p.name for p in out_root.glob("*/spyke_demo-step*.safetensors")}

        tmux("send-keys", "-t", session, "a")
        wait_for(session, lambda t: "Save and stop" in t, 10, "the abort dialog")
        tmux("send-keys", "-t", session, "s")
        text = wait_for(session, lambda t: "ABORTED" in t, 40, "the aborted run")
        aborted_at = step_of(text)
        abort_file = next(out_root.glob(f"*/spyke_demo-step{aborted_at:08d}.safetensors"), None)
        assert abort_file is not None and abort_file.stat().st_size > 0, (saved_before, aborted_at)

        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 20
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        end_server()


def end_server() -> None:
    """A cockpit that loses its terminal keeps training by design: end it with the test."""
    panes = subprocess.run(["tmux", "-L", SOCKET, "list-panes", "-a", "-F", "#{pane_pid}"],
                           capture_output=True, text=True).stdout.split()
    children = []
    for pid in panes:
        try:
            children += psutil.Process(int(pid)).children(recursive=True)
        except psutil.Error:
            pass
    subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


@pytest.mark.skipif(shutil.which("tmux") is None or not BIN.exists(), reason="needs tmux and the console script")
@pytest.mark.parametrize("term", ["screen", "xterm"])
def test_checkboxes_read_off_and_on_in_a_plain_terminal(tmp_path, tiny_cache, term):
    session = f"spyke-{uuid.uuid4().hex[:8]}"
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && TERM={term} SPYKE_CACHE={tiny_cache} {BIN} demo; sleep 30"
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd)
    try:
        text = wait_for(session, lambda t: "spyke_demo-step" in t and "allow_pickle" in t, 60, "the demo form")
        line = next(t for t in text.splitlines() if "allow_pickle" in t)
        assert "[ ] allow_pickle" in line and "▐" not in line and "X" not in line.split("allow_pickle")[0], line
        assert "space Pause/Resume" in text and " p Pause/Resume" not in text
    finally:
        end_server()
