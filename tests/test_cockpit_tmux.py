"""End to end in a real terminal: tmux runs `spyke-cockpit demo` at 120×40 and a script drives it by keys."""

from __future__ import annotations

import re
import time

import pytest

from tests.tmux_term import BIN, HAVE_TMUX, Term, step_of

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not HAVE_TMUX, reason="needs tmux and the console script")
def test_demo_in_tmux_pause_save_abort_quit(tmp_path):
    exit_file = tmp_path / "exit_code"
    # the demo's model/dataset cache is the user's default one (built once, reused across runs)
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && {BIN} demo; echo $? > {exit_file}; sleep 30"
    term = Term(cmd)
    try:
        term.wait_for(lambda t: "spyke_demo-step" in t, 60, "the demo form and its preview")
        term.keys("C-r")
        term.wait_for(lambda t: step_of(t) >= 3, 120, "training steps")

        term.keys("space")
        text = term.wait_for(lambda t: "PAUSED" in t and "halting" not in t, 20, "PAUSED")
        first = step_of(text)
        time.sleep(1.5)
        assert step_of(term.screen()) == first, "the step count moved while paused"

        term.keys("space")
        term.wait_for(lambda t: step_of(t) > first and "PAUSED" not in t, 30, "steps after resume")

        term.keys("s")
        text = term.wait_for(lambda t: re.search(r"spyke_demo-step\d{8}\.safetensors\s+\d", t), 30,
                        "a checkpoint row")
        out_root = tmp_path / "spyke-demo-output"
        assert list(out_root.glob("*/spyke_demo-step*.safetensors")), "manual save wrote no file"
        saved_before = {p.name for p in out_root.glob("*/spyke_demo-step*.safetensors")}

        term.keys("a")
        term.wait_for(lambda t: "Save and stop" in t, 10, "the abort dialog")
        term.keys("s")
        text = term.wait_for(lambda t: "ABORTED" in t, 40, "the aborted run")
        aborted_at = step_of(text)
        abort_file = next(out_root.glob(f"*/spyke_demo-step{aborted_at:08d}.safetensors"), None)
        assert abort_file is not None and abort_file.stat().st_size > 0, (saved_before, aborted_at)

        term.keys("q")
        deadline = time.monotonic() + 20
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        term.close()


@pytest.mark.skipif(not HAVE_TMUX, reason="needs tmux and the console script")
@pytest.mark.parametrize("term_name", ["screen", "xterm"])
def test_checkboxes_read_off_and_on_in_a_plain_terminal(tmp_path, tiny_cache, term_name):
    cmd = f"cd {tmp_path} && unset COLUMNS LINES && TERM={term_name} SPYKE_CACHE={tiny_cache} {BIN} demo; sleep 30"
    term = Term(cmd)
    try:
        text = term.wait_for(lambda t: "spyke_demo-step" in t and "allow_pickle" in t, 60, "the demo form")
        line = next(t for t in text.splitlines() if "allow_pickle" in t)
        assert "[ ] allow_pickle" in line and "▐" not in line and "X" not in line.split("allow_pickle")[0], line
        assert "space Pause/Resume" in text and " p Pause/Resume" not in text
    finally:
        term.close()
