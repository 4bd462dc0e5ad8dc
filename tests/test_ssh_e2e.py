"""End to end over real SSH on loopback: a dropped connection does not stop training,
and a second SSH session attaches, sees progress and pauses the run with ``space``.

The test installs nothing: it needs ``tmux``, ``ssh``, ``ssh-keygen`` and ``/usr/sbin/sshd``
(``.ci/run`` apt-installs tmux, openssh-server and openssh-client). It starts its OWN sshd
(own config, host key, user key, authorized_keys, free port on 127.0.0.1, pid file in tmp)
and never touches a system sshd; everything it starts is stopped by pid at the end.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EXE = VENV_BIN / "spyke-cockpit"
SSHD = "/usr/sbin/sshd"
MISSING = [name for name, path in (("tmux", shutil.which("tmux")), ("ssh", shutil.which("ssh")),
                                   ("ssh-keygen", shutil.which("ssh-keygen")),
                                   ("sshd", SSHD if os.access(SSHD, os.X_OK) else None)) if path is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING) or not EXE.exists(),
    reason=f"needs {', '.join(MISSING) or 'the spyke-cockpit entry point'}: "
           "apt-get install -y tmux openssh-server openssh-client (.ci/run installs them)")

STEPS_TOTAL = 60          # long enough that the run is still going when the viewer attaches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, on_fail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_fail()}")


class Tmux:
    """A private tmux server (own socket), so the test never touches the user's sessions."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]

    def __call__(self, *args: str, check: bool = True) -> str:
        return subprocess.run(self.base + list(args), capture_output=True, text=True, check=check,
                              timeout=20).stdout

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target, check=False)

    def pane_pid(self, target: str) -> int:
        return int(self("display-message", "-p", "-t", target, "#{pane_pid}").strip())

    def kill_server(self) -> None:
        self("kill-server", check=False)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True,
                       timeout=30)
    auth = d / "authorized_keys"
    auth.write_text((d / "user_key.pub").read_text())
    os.chmod(auth, 0o600)
    port = free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        "PrintMotd no", "PrintLastLog no", "X11Forwarding no", "AllowTcpForwarding no", "ClientAliveInterval 0",
        "LogLevel ERROR", ""]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)         # sshd's privilege-separation dir
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port), "-h", str(d / "host_key")],
                            stdout=log, stderr=subprocess.STDOUT)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {(d / 'sshd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, 15, "sshd to listen")
        ssh = ["ssh", "-F", "/dev/null", "-tt", "-i", str(d / "user_key"), "-p", str(port),
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", f"{getpass.getuser()}@127.0.0.1"]
        yield ssh
    finally:
        proc.send_signal(signal.SIGTERM)                          # our sshd, by pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """SPYKE_CACHE with the tiny model and the demo dataset already built (the remote side reuses it)."""
    from engine.demo import prepare_demo

    cache = tmp_path_factory.mktemp("spyke_cache")
    prepare_demo(root=cache, output_root=cache / "unused-output")
    return cache


def remote(cmd: str, cwd: Path, cache: Path) -> str:
    """A command line for the remote shell: SSH sessions do not inherit the venv or our env."""
    env = (f"PATH={VENV_BIN}:/usr/local/bin:/usr/bin:/bin SPYKE_CACHE={cache} TERM=xterm-256color "
           f"LANG=C.UTF-8 PYTHONPATH={ROOT}")
    return f"cd {cwd} && exec env {env} {cmd}"


def events_of(path: Path) -> list[dict]:
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            pass
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def main_thread_cpu(pid: int) -> float:
    """Seconds of CPU used so far by the process's main thread (the one the UI ran on)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_dropped_ssh_keeps_training_and_a_second_session_attaches_and_pauses(sshd, demo_cache, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    tmux = Tmux(f"spyke-e2e-{os.getpid()}")
    train_pid = None
    try:
        # 1. the cockpit over SSH, training
        cockpit = remote(f"{EXE} demo --autostart --resolution=64 --cache_latents --max_train_epochs= "
                         f"--max_train_steps={STEPS_TOTAL} --save_every_n_steps=1000",
                         work, demo_cache)
        tmux("new-session", "-d", "-s", "train", "-x", "150", "-y", "45",
             "exec " + " ".join(sshd) + f" '{cockpit}'")
        ssh_pid = tmux.pane_pid("train")
        wait_for(lambda: _step_on_screen(tmux.screen("train")) >= 1, 150, "steps on the cockpit's screen",
                 lambda: tmux.screen("train"))
        events = wait_for(lambda: next(iter(work.glob("spyke-demo-output/*/.spyke/*/events.jsonl")), None), 10,
                          "the run folder")
        run_dir = events.parent
        train_pid = next(e["pid"] for e in events_of(events) if e["type"] == "run_started")
        assert (run_dir.stat().st_mode & 0o777) == 0o700

        # 2. the connection drops: kill the ssh client
        os.kill(ssh_pid, signal.SIGKILL)
        time.sleep(1.0)
        assert pid_alive(train_pid), "the training process died with its terminal"
        n0 = sum(e["type"] == "step" for e in events_of(events))
        cpu0, t0 = main_thread_cpu(train_pid), time.monotonic()

        # 3. a second SSH session attaches, sees progress and pauses with space
        tmux("new-session", "-d", "-s", "view", "-x", "150", "-y", "45",
             "exec " + " ".join(sshd) + f" '{remote(f'{EXE} attach {run_dir}', work, demo_cache)}'")
        wait_for(lambda: _step_on_screen(tmux.screen("view")) >= 1, 90, "progress on the attached screen",
                 lambda: tmux.screen("view"))
        assert f"/{STEPS_TOTAL}" in tmux.screen("view")
        wait_for(lambda: sum(e["type"] == "step" for e in events_of(events)) > n0, 90,
                 "steps written after the hang-up")
        assert pid_alive(train_pid)
        ui_share = (main_thread_cpu(train_pid) - cpu0) / (time.monotonic() - t0)
        assert ui_share < 0.25, f"the detached UI thread burns {ui_share:.0%} of a core (spinning on the dead tty?)"
        assert "terminal hung up" in (run_dir / "console.log").read_text()
        tmux("send-keys", "-t", "view", "Space")
        wait_for(lambda: any(e["type"] == "phase" and e["phase"] == "paused" for e in events_of(events)), 60,
                 "the pause in events.jsonl", lambda: tmux.screen("view"))
        wait_for(lambda: "PAUSED" in tmux.screen("view"), 20, "PAUSED on the attached screen",
                 lambda: tmux.screen("view"))
        assert any(e["type"] == "log" and "control: pause from attach" in e["message"] for e in events_of(events))
        # the run stands still while paused (the viewer redraws at 1 Hz, so compare the engine's own record)
        paused_at = max(e["step"] for e in events_of(events) if e["type"] == "step")
        time.sleep(1.5)
        assert max(e["step"] for e in events_of(events) if e["type"] == "step") == paused_at
        assert _step_on_screen(tmux.screen("view")) <= paused_at

        # 4. resume from the viewer; the headless survivor trains to the end
        tmux("send-keys", "-t", "view", "Space")
        finished = wait_for(lambda: next((e for e in events_of(events) if e["type"] == "finished"), None), 600,
                            "the run to finish", lambda: tmux.screen("view"))
        assert finished["status"] == "completed" and finished["step"] == STEPS_TOTAL
        assert Path(finished["final_path"]).is_file()
        wait_for(lambda: not pid_alive(train_pid), 30, "the detached training process to exit")
        wait_for(lambda: "finished" in tmux.screen("view").lower() or "completed" in tmux.screen("view").lower(),
                 20, "the viewer to show the end", lambda: tmux.screen("view"))
        tmux("send-keys", "-t", "view", "q")
    finally:
        tmux.kill_server()
        if train_pid and pid_alive(train_pid):
            os.kill(train_pid, signal.SIGKILL)


def _step_on_screen(text: str) -> int:
    import re

    m = re.search(r"step (\d+)/(\d+)", text)
    return int(m.group(1)) if m and int(m.group(2)) > 0 else -1
