"""A run that ends while nobody watches rings the bell and sends a desktop notification (off with --no_notify)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.notify import BELL, notification_commands, notify_run_end, run_end_text, terminal_sequences

ROOT = Path(__file__).resolve().parent.parent
WHICH = {"notify-send": "/usr/bin/notify-send", "osascript": "/usr/bin/osascript"}.get


class FakeTty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_linux_desktop_gets_notify_send_only_with_a_display_and_the_binary():
    title, body = run_end_text("completed", 128, run="demo-1")
    assert (title, body) == ("spyke-cockpit: run demo-1 finished", "completed at step 128")
    want = [["/usr/bin/notify-send", "--app-name=spyke-cockpit", title, body]]
    assert notification_commands("linux", {"DISPLAY": ":0"}, WHICH, title, body) == want
    assert notification_commands("linux", {"WAYLAND_DISPLAY": "wayland-0"}, WHICH, title, body) == want
    assert notification_commands("linux", {}, WHICH, title, body) == []                  # over SSH: no desktop
    assert notification_commands("linux", {"DISPLAY": ":0"}, lambda name: None, title, body) == []


def test_macos_gets_osascript_with_the_text_quoted():
    commands = notification_commands("darwin", {}, WHICH, 'spyke-cockpit: run "a" failed', 'at step 3: bad \\ "x"')
    assert commands == [["/usr/bin/osascript", "-e", 'display notification "at step 3: bad \\\\ \\"x\\"" '
                                                      'with title "spyke-cockpit: run \\"a\\" failed"']]
    assert notification_commands("win32", {"DISPLAY": ":0"}, WHICH, "t", "b") == []


def test_each_way_a_run_ends_has_its_own_words():
    assert run_end_text("aborted", 7, run="r") == ("spyke-cockpit: run r stopped", "aborted at step 7")
    assert run_end_text("failed", 9, "non-finite loss at step 9", "r") == (
        "spyke-cockpit: run r hit a NaN", "stopped at step 9: non-finite loss at step 9")
    assert run_end_text("failed", 2, "CUDA out of memory", "r") == ("spyke-cockpit: run r failed",
                                                                     "at step 2: CUDA out of memory")


def test_a_terminal_gets_the_bell_and_osc_9_and_777_only_when_it_is_a_tty():
    tty, pipe = FakeTty(True), FakeTty(False)
    for out in (tty, pipe):
        assert notify_run_end("completed", 4, run="r", out=out, platform="linux", env={}, which=WHICH) == []
    assert tty.getvalue() == ("\a\x1b]9;spyke-cockpit: run r finished: completed at step 4\a"
                              "\x1b]777;notify;spyke-cockpit: run r finished;completed at step 4\a")
    assert pipe.getvalue() == ""


def test_an_error_text_cannot_end_the_escape_sequence_early():
    text = terminal_sequences("spyke-cockpit: run r failed", "at step 1: \x1b]52;c;evil\a; and more")
    assert text.count("\x1b") == 2 and text.count("\a") == 3        # our two sequences and the bell, no others
    assert "evil" in text and ";c;" not in text


def test_notify_runs_the_desktop_command_and_survives_one_that_fails():
    ran = []
    commands = notify_run_end("completed", 1, run="r", platform="linux", env={"DISPLAY": ":0"}, which=WHICH,
                              spawn=ran.append)
    assert ran == commands and len(commands) == 1
    from engine.notify import run_quietly

    run_quietly(["/no/such/notifier"])                              # never raises
    run_quietly([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_a_cockpit_whose_terminal_went_notifies_the_end_of_the_run_it_was_training(monkeypatch):
    from cockpit.hangup import HangupGuard

    sent = []
    monkeypatch.setattr("engine.api.notify_run_end", lambda *a, **k: sent.append((a, k)))

    class Source:
        owns_run, run_dir = True, None

        def __init__(self, running: bool, no_notify: bool = False) -> None:
            self.running = running
            self.config = SimpleNamespace(no_notify=no_notify, output_name="spyke")
            self.result = SimpleNamespace(status="completed", global_step=12, error=None, run_dir=Path("/r/run-1"))

        def wait(self, timeout=None) -> bool:
            self.running = False
            return True

        def outcome(self) -> str:
            return "completed"

    for running, no_notify in ((True, False), (False, False), (True, True)):
        app = SimpleNamespace(source=Source(running, no_notify), starting=False, stop_buffering=lambda: None)
        guard = HangupGuard(app)
        monkeypatch.setattr(guard, "redirect_stdio", lambda to_log=True: None)
        assert guard.detach() == 0
    # only the run that ended unwatched, and not with --no_notify
    assert sent == [(("completed", 12, None), {"run": "run-1"})]


# ---------------------------------------------------------------------------- a real headless run
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from engine.tiny import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("notify_data"), num_images=2, num_repeats=1, resolution=64,
                            seed=3)


def headless(tiny_cache: Path, dataset, out_dir: Path, tty: bool, *extra: str, env: dict) -> str:
    """Train 2 tiny steps headless with stdout on a pty (``tty``) or a pipe; all it wrote."""
    args = [sys.executable, "-m", "cockpit.cli", "train", "--headless",
            f"--pretrained_model_name_or_path={tiny_cache / 'tiny-sd15'}", f"--dataset_config={dataset.dataset_toml}",
            f"--output_dir={out_dir}", "--resolution=64", "--max_train_steps=2", "--network_dim=4", "--seed=1", *extra]
    if not tty:
        done = subprocess.run(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=240)
        return (done.stdout + done.stderr).decode("utf-8", "replace")
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 240)
            if not ready:
                raise AssertionError("the headless run wrote nothing for 240 s")
            try:
                chunk = os.read(master, 65536)
            except OSError:           # EIO: the run closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(60)
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_headless_run_rings_its_terminal_at_the_end_but_not_a_pipe_nor_with_no_notify(tiny_cache, small_dataset,
                                                                                        tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "notified"
    fake = bin_dir / "notify-send"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {record}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DISPLAY": ":99"}
    env.pop("WAYLAND_DISPLAY", None)

    on_tty = headless(tiny_cache, small_dataset, tmp_path / "tty", True, env=env)
    assert "finished: completed at step 2" in on_tty, on_tty
    tail = on_tty[on_tty.index("finished: completed at step 2"):]
    assert tail.count(BELL) == 3 and "\x1b]777;notify;spyke-cockpit: run " in tail, repr(tail)
    if sys.platform.startswith("linux"):
        lines = record.read_text().splitlines()
        assert lines[0] == "--app-name=spyke-cockpit" and lines[2] == "completed at step 2", lines
        record.unlink()

    # a pipe (a detached run writes to console.log): no bell, no escape codes; the desktop still hears of it
    on_pipe = headless(tiny_cache, small_dataset, tmp_path / "pipe", False, env=env)
    assert "finished: completed at step 2" in on_pipe and BELL not in on_pipe and "\x1b]" not in on_pipe
    if sys.platform.startswith("linux"):
        assert record.read_text().splitlines()[2] == "completed at step 2"
        record.unlink()

    quiet = headless(tiny_cache, small_dataset, tmp_path / "quiet", True, "--no_notify", env=env)
    assert "finished: completed at step 2" in quiet and BELL not in quiet, repr(quiet)
    assert not record.exists(), "--no_notify still ran notify-send"
