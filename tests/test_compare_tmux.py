"""`spyke-cockpit compare RUN` in a real terminal (tmux, 120×40): half-block cells, arrow keys move."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from tests.sample_run import PROMPTS, write_sample_run
from tests.test_cockpit_tmux import BIN, SOCKET, tmux, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("tmux") is None or not BIN.exists(), reason="needs tmux and the console script")
def test_compare_in_tmux_shows_half_block_cells_and_arrows_move(tmp_path):
    run_dir = write_sample_run(tmp_path)
    session = f"spyke-cmp-{uuid.uuid4().hex[:8]}"
    exit_file = tmp_path / "exit_code"
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && {BIN} compare {run_dir}; echo $? > {exit_file}; sleep 30"
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd)
    try:
        text = wait_for(session, lambda t: "selected: step 400" in t, 60, "the compare screen on the best row")
        assert "▀" in text or "▄" in text, "no half-block cells on screen"
        assert "step 400 ★ best" in text
        tmux("send-keys", "-t", session, "Down")
        wait_for(session, lambda t: "selected: step 600" in t and f"prompt 0: {PROMPTS[0]}" in t, 10, "down")
        tmux("send-keys", "-t", session, "Right")
        wait_for(session, lambda t: f"prompt 1: {PROMPTS[1]}" in t, 10, "right")
        tmux("send-keys", "-t", session, "Enter")
        wait_for(session, lambda t: "esc closes" in t, 10, "the image, large")
        tmux("send-keys", "-t", session, "Escape")
        wait_for(session, lambda t: "selected: step 600" in t and "esc closes" not in t, 10, "back to the grid")
        tmux("send-keys", "-t", session, "q")
        wait_for(session, lambda t: exit_file.exists(), 20, "the exit")
        assert exit_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", SOCKET, "kill-session", "-t", session], capture_output=True)
