"""`spyke-cockpit serve`: the attach view served to a browser on 127.0.0.1 only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
