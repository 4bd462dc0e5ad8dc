"""`spyke-cockpit serve`: the attach view served to a browser on 127.0.0.1 only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cockpit.serve import serve_command

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_attach_on_the_run():
    cmd = serve_command("/runs/a b", read_only=True)
    assert cmd.endswith("-m cockpit.cli attach '/runs/a b' --read-only")
    assert "attach" in serve_command(None, read_only=False) and "--read-only" not in serve_command(None, False)


def test_serve_binds_loopback_and_serves_the_page(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cockpit.cli", "serve", str(tmp_path), "--port", str(port)],
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
