"""`spyke-cockpit compare RUN` in a real terminal (tmux, 120×40): half-block cells, arrow keys move."""

from __future__ import annotations

import pytest

from tests.sample_run import PROMPTS, write_sample_run
from tests.tmux_term import BIN, HAVE_TMUX, Term

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not HAVE_TMUX, reason="needs tmux and the console script")
def test_compare_in_tmux_shows_half_block_cells_and_arrows_move(tmp_path):
    run_dir = write_sample_run(tmp_path)
    exit_file = tmp_path / "exit_code"
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && {BIN} compare {run_dir}; echo $? > {exit_file}; sleep 30"
    term = Term(cmd)
    try:
        text = term.wait_for(lambda t: "selected: step 400" in t, 60, "the compare screen on the best row")
        assert "▀" in text or "▄" in text, "no half-block cells on screen"
        assert "step 400 ★ best" in text
        term.keys("Down")
        term.wait_for(lambda t: "selected: step 600" in t and f"prompt 0: {PROMPTS[0]}" in t, 10, "down")
        term.keys("Right")
        term.wait_for(lambda t: f"prompt 1: {PROMPTS[1]}" in t, 10, "right")
        term.keys("Enter")
        term.wait_for(lambda t: "esc closes" in t, 10, "the image, large")
        term.keys("Escape")
        term.wait_for(lambda t: "selected: step 600" in t and "esc closes" not in t, 10, "back to the grid")
        term.keys("q")
        term.wait_for(lambda t: exit_file.exists(), 20, "the exit")
        assert exit_file.read_text().strip() == "0"
    finally:
        term.close()
