"""`spyke-cockpit serve`: the attach view served to a browser on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cockpit.serve import serve_command
from engine.events import RunFinished, RunStarted

ROOT = Path(__file__).resolve().parent.parent


def finished_run(root: Path) -> Path:
    run_dir = root / "out" / ".spyke" / "a-run"
    run_dir.mkdir(parents=True)
    events = [RunStarted(run_id="a-run", output_dir=str(root / "out"), output_name="a", total_steps=1, num_epochs=1,
                         batches_per_epoch=1, device="cpu", pid=1, config={}),
              RunFinished(status="completed", step=1)]
    (run_dir / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in events))
    return run_dir


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cockpit.cli", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_attach_on_the_run():
    cmd = serve_command("/runs/a b", read_only=True)
    assert cmd.startswith("exec ")     # the process serve starts is the viewer, not a shell around it
    assert cmd.endswith("-m cockpit.cli attach '/runs/a b' --read-only")
    assert "attach" in serve_command(None, read_only=False) and "--read-only" not in serve_command(None, False)
    assert serve_command("a-run", False, root="/my runs").endswith("attach a-run --root '/my runs'")


def test_serve_binds_loopback_and_serves_the_page(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cockpit.cli", "serve", str(finished_run(tmp_path)), "--port",
                             str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        page = None
        while time.monotonic() < deadline and page is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    page = (resp.status, resp.read().decode("utf-8", "replace"))
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        assert page is not None and page[0] == 200
        assert "spyke-cockpit" in page[1]
        # bound to loopback only: the port is not open on another local address
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            with socket.socket() as s:
                s.settimeout(1)
                assert s.connect_ex((addr, port)) != 0, f"serve is reachable on {addr}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_refuses_a_run_it_cannot_show_before_serving(tmp_path):
    out = serve(str(tmp_path / "no-such-run"), "--port", str(free_port()))
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith(f"spyke-cockpit: error: run '{tmp_path / 'no-such-run'}': no such run folder")
    assert len(out.stderr.splitlines()) == 1
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.jsonl").write_text("not\nevents\n")
    out = serve(str(garbage), "--port", str(free_port()))
    assert (out.returncode, out.stdout) == (2, "")
    want = f"{garbage / 'events.jsonl'}: not a spyke-cockpit run (0 of 2 lines readable)"
    assert out.stderr == f"spyke-cockpit: error: {want}\n"


def test_serve_refuses_a_bad_or_busy_port_in_one_line(tmp_path):
    run_dir = str(finished_run(tmp_path))
    for port in ("99999", "0", "http"):
        out = serve(run_dir, "--port", port)
        assert (out.returncode, out.stdout) == (2, ""), out
        assert out.stderr == f"spyke-cockpit: error: --port={port}: not a port number; use 1..65535 (default 8000)\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = serve(run_dir, "--port", str(port))
    assert (out.returncode, out.stdout) == (2, ""), out
    assert out.stderr == (f"spyke-cockpit: error: --port={port}: 127.0.0.1:{port} is already in use; "
                          "pick another --port\n")


# ---------------------------------------------------------------------------- viewer processes end
WEB_ENV = {"TEXTUAL_DRIVER": "textual.drivers.web_driver:WebDriver", "COLUMNS": "80", "ROWS": "24"}

CLIENT = r"""
import asyncio, sys, aiohttp
async def main(url):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                ws = await session.ws_connect(url)
                break
            except aiohttp.ClientConnectionError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        got, told = 0, False
        async for message in ws:
            got += len(message.data) if isinstance(message.data, (bytes, str)) else 0
            if got > 1000 and not told:
                print("connected", flush=True)
                told = True
        print("closed", flush=True)
asyncio.run(main(sys.argv[1]))
"""


def wait_until(predicate, timeout: float) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.05)
    return True


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Served:
    """A real ``spyke-cockpit serve`` on a free loopback port with one websocket client (a browser tab)."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "cockpit.cli", "serve", *args, "--port",
                                        str(self.port)], cwd=cwd, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
        self.client = subprocess.Popen([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{self.port}/ws?width=80"
                                        "&height=24"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.client.stdout.readline()
        assert line == "connected\n", (line, self.server.poll())
        viewers = [p for p in psutil.Process(self.server.pid).children(recursive=True) if "cockpit.cli" in p.cmdline()]
        assert len(viewers) == 1 and "attach" in viewers[0].cmdline(), viewers
        self.viewer = viewers[0].pid

    def close(self) -> None:
        for proc in (self.client, self.server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if not gone(self.viewer):
            os.kill(self.viewer, signal.SIGKILL)


@pytest.fixture
def served(tmp_path):
    tab = Served(str(finished_run(tmp_path)))
    yield tab
    tab.close()


def test_serve_root_finds_the_run_by_id_and_its_viewers_look_there_too(tmp_path):
    finished_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "cockpit.cli", "serve", "a-run", "--port", str(free_port())],
                         cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"no such run folder or run id under {elsewhere}" in out.stderr, out
    tab = Served("a-run", "--root", str(tmp_path / "out"), cwd=elsewhere)     # the viewer drew the run
    try:
        assert psutil.Process(tab.viewer).cmdline()[-2:] == ["--root", str(tmp_path / "out")]
    finally:
        tab.close()


def test_a_tab_whose_client_dies_without_closing_ends_its_viewer(served):
    served.client.kill()          # the TCP connection drops, no websocket close frame
    served.client.wait(10)
    assert wait_until(lambda: gone(served.viewer), 10), "the viewer outlived its tab"
    assert served.server.poll() is None       # serve itself goes on for other tabs


def test_stopping_serve_with_a_tab_open_ends_its_viewer_and_closes_the_tab(served):
    served.server.send_signal(signal.SIGINT)
    assert served.server.wait(15) == 0
    assert gone(served.viewer), "serve left a viewer behind"
    assert served.client.stdout.readline() == "closed\n"      # the browser is told, not left hanging


def test_a_viewer_ends_when_serve_is_killed(served):
    served.server.kill()          # no shutdown at all: the viewer notices its pipe and parent are gone
    served.server.wait(10)
    assert wait_until(lambda: gone(served.viewer), 10), "a viewer outlived serve"


def blocked_writing_to_a_pipe(pid: int) -> bool:
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux /proc to see a blocked write")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_viewer_answers_a_signal_within_a_second_even_while_its_output_is_not_read(tmp_path, signum):
    """As serve runs it (web driver, pipes), with nobody reading its output: the render is stuck in a write."""
    viewer = subprocess.Popen([sys.executable, "-m", "cockpit.cli", "attach", str(finished_run(tmp_path))],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env={**os.environ, **WEB_ENV})
    try:
        import fcntl

        out = viewer.stdout.fileno()
        fcntl.fcntl(out, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)    # smaller than one frame (~5 KB)
        prelude = b"__GANGLION__\n"
        assert os.read(out, len(prelude)) == prelude                    # unbuffered: the rest stays in the pipe
        assert wait_until(lambda: blocked_writing_to_a_pipe(viewer.pid), 30), "the viewer never blocked"
        started = time.monotonic()
        viewer.send_signal(signum)
        viewer.wait(5)
        took = time.monotonic() - started
        assert took < 1.0, f"{signal.Signals(signum).name} took {took:.2f}s"
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait(5)
