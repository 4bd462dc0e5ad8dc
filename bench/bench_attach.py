"""Bench for ``spyke-cockpit attach`` (by hand, not a test): needs tmux.

    .venv/bin/python bench/bench_attach.py [--steps 1000000] [--skip-training]

1. first full screen: a finished run whose events.jsonl holds N step records (plus memory
   samples, phases, checkpoints); ``spyke-cockpit attach`` starts in a real terminal (tmux,
   160x50) and the clock stops when ``step N/N`` and the checkpoint table's "K saved" have
   been written to the terminal (launch of the process included). Measured two ways: from
   the pane's output stream (``pipe-pane``, no probe process while waiting), and by polling
   the screen with ``capture-pane`` every 10 ms (each poll is a tmux client process, which
   competes with the viewer for the 2 cores). Target ≤ 1 s for N = 1,000,000.
2. CPU while tailing: the same viewer on a live run that this script extends by ~20 steps/s;
   the viewer's CPU over 10 s once it settled. Target ≤ 5 % of a core.
3. training steps/s with 0 vs 3 read-only viewers: one headless demo run, its step rate
   measured (from the step records' timestamps) in alternating windows 0 / 3 / 0 / 3 viewers,
   each 3-viewer window against the 0-viewer ones either side; the training's CPU time is
   paired the same way (the finer measure on a noisy shared box). ``--train-cpus 0`` confines
   the training to one core, the shape of a GPU run. Target: equal within ±2 %.

    .venv/bin/python bench/bench_attach.py --skip-screen --pairs 20 [--train-cpus 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXE = str(ROOT / ".venv" / "bin" / "spyke-cockpit")


def make_run(base: Path, n_steps: int, *, pid: int, finished: bool, run_id: str = "bench-run") -> Path:
    """A run folder with ``n_steps`` step records, written as the engine writes them."""
    from engine.events import CheckpointSaved, MemorySample, PhaseChanged, RunFinished, RunStarted

    run_dir = base / "out" / ".spyke" / run_id
    (run_dir / "control").mkdir(parents=True)
    os.chmod(run_dir, 0o700)
    # a live run's start must not predate its process (a reused pid is told apart by start time)
    t0 = time.time() if not finished else time.time() - n_steps * 0.01 - 10
    every = max(1, n_steps // 20)
    with open(run_dir / "events.jsonl", "w") as fh:
        fh.write(RunStarted(run_id=run_id, output_dir=str(base / "out"), output_name="bench", total_steps=n_steps,
                            num_epochs=1, batches_per_epoch=n_steps, device="cpu", pid=pid, config={},
                            checkpoint_steps=list(range(every, n_steps + 1, every)), t=t0).to_json() + "\n")
        fh.write(PhaseChanged(phase="training", t=t0).to_json() + "\n")
        lines = []
        for i in range(1, n_steps + 1):
            t = t0 + i * 0.01
            loss = 0.5 + 0.4 * ((i * 7919) % 1000) / 1000.0
            lines.append(f'{{"v":1,"type":"step","t":{t!r},"step":{i},"epoch":1,"loss":{loss!r},'
                         f'"lrs":{{"unet":0.0001,"text_encoder":5e-05}},"step_seconds":0.01,"skipped":false}}')
            if i % 200 == 0:
                lines.append(MemorySample(device="cpu", rss=100 << 20, sys_used=1 << 30, sys_available=3 << 30,
                                          sys_total=4 << 30, t=t).to_json())
            if i % every == 0:
                lines.append(CheckpointSaved(path=str(base / "out" / f"bench-{i:06d}.safetensors"), step=i, epoch=1,
                                             bytes=1 << 20, kind="step", loss=loss, verified=True, t=t).to_json())
            if len(lines) >= 100_000:
                fh.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            fh.write("\n".join(lines) + "\n")
        if finished:
            fh.write(RunFinished(status="completed", step=n_steps, t=t0 + n_steps * 0.01 + 1).to_json() + "\n")
    return run_dir


def tmux(*args: str, check: bool = True) -> str:
    for attempt in range(3):
        out = subprocess.run(["tmux", *args], capture_output=True, text=True)
        if out.returncode == 0 or not check:
            return out.stdout
        # a server that is exiting (its last session just killed) refuses a new session for a moment
        if args[0] != "new-session" or attempt == 2:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        time.sleep(0.2)
    return ""


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session, check=False)


def first_screen(run_dir: Path, n_steps: int, n_checkpoints: int) -> float:
    """Launch -> the terminal has shown both marks, seen by polling ``capture-pane`` every 10 ms.
    Each poll is a tmux client process, so on 2 cores the probe itself slows what it measures."""
    session = f"bench-first-{os.getpid()}"
    t0 = time.perf_counter()
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", f"exec {EXE} attach --read-only {run_dir}")
    try:
        while time.perf_counter() - t0 < 30:
            text = screen(session)
            if f"step {n_steps}/{n_steps}" in text and f"{n_checkpoints} saved" in text:
                return time.perf_counter() - t0
            time.sleep(0.01)
        raise RuntimeError("the screen never showed the run:\n" + screen(session))
    finally:
        tmux("kill-session", "-t", session, check=False)


def first_screen_written(run_dir: Path, n_steps: int, n_checkpoints: int, work: Path) -> float:
    """Launch -> both marks have been written to the terminal: tmux copies the pane's output to a
    file (``pipe-pane``) that this process reads every 5 ms, so no tmux client runs while it waits.
    The viewer is held at a ``wait-for`` until the pipe is in place; the clock starts at the signal."""
    session = f"bench-written-{os.getpid()}"
    out = work / f"{session}.out"
    out.write_bytes(b"")
    channel = f"{session}-go"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50",
         f"tmux wait-for {channel}; exec {EXE} attach --read-only {run_dir}")
    try:
        tmux("pipe-pane", "-o", "-t", session, f"cat >> {out}")
        marks = (f"step {n_steps}/{n_steps}".encode(), f"{n_checkpoints} saved".encode())
        t0 = time.perf_counter()
        tmux("wait-for", "-S", channel)
        seen = b""
        with open(out, "rb") as fh:
            while time.perf_counter() - t0 < 30:
                seen += fh.read()
                if all(m in seen for m in marks):
                    return time.perf_counter() - t0
                time.sleep(0.005)
        raise RuntimeError("the viewer never wrote the run's screen:\n" + screen(session))
    finally:
        tmux("kill-session", "-t", session, check=False)


def pane_pid(session: str) -> int:
    return int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip())


class Appender(threading.Thread):
    """Extends a live run's events.jsonl like a training at ``rate`` steps/s."""

    def __init__(self, path: Path, first_step: int, rate: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.path, self.step, self.rate = path, first_step, rate
        self.stop_event = threading.Event()

    def run(self) -> None:
        with open(self.path, "a") as fh:
            while not self.stop_event.wait(1.0 / self.rate):
                self.step += 1
                fh.write(f'{{"v":1,"type":"step","t":{time.time()!r},"step":{self.step},"epoch":1,"loss":0.5,'
                         f'"lrs":{{"unet":0.0001}},"step_seconds":0.05,"skipped":false}}\n')
                fh.flush()


def tail_cpu(base: Path, n_steps: int) -> float:
    import psutil

    run_dir = make_run(base / "live", n_steps, pid=os.getpid(), finished=False, run_id="bench-live")
    appender = Appender(run_dir / "events.jsonl", n_steps)
    appender.start()
    session = f"bench-tail-{os.getpid()}"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", f"exec {EXE} attach --read-only {run_dir}")
    try:
        proc = psutil.Process(pane_pid(session))
        time.sleep(15)              # snapshot + exact history in the background, then steady tailing
        c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(10)
        c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        if appender.step not in (None,) and f"step {appender.step}" not in screen(session) and \
                "step" not in screen(session):
            raise RuntimeError("viewer not showing steps:\n" + screen(session))
        return 100.0 * (c1 - c0) / (t1 - t0)
    finally:
        appender.stop_event.set()
        tmux("kill-session", "-t", session, check=False)


def step_rate(events: Path, t_from: float, t_to: float) -> tuple[float, int]:
    ts = []
    with open(events, "rb") as fh:
        for raw in fh:
            if raw.startswith(b'{"v":1,"type":"step"'):
                t = json.loads(raw)["t"]
                if t_from <= t <= t_to:
                    ts.append(t)
    if len(ts) < 2:
        return 0.0, len(ts)
    return (len(ts) - 1) / (ts[-1] - ts[0]), len(ts)


def _cpu_seconds(proc) -> float:
    try:
        times = proc.cpu_times()
    except Exception:  # noqa: BLE001 - the process is gone
        return 0.0
    return times.user + times.system


def training_with_viewers(base: Path, window: float = 10.0, pairs: int = 8, cpu_log: list | None = None,
                          train_cpus: set[int] | None = None) -> list[tuple[int, float, int]]:
    """Step rate in windows alternating 0 / 3 viewers (0, 3, 0, 3, ..., 0): ``pairs`` 3-viewer windows,
    each between two 0-viewer windows, so a slow drift of the box's speed cancels out. ``cpu_log`` gets
    (viewers, training's CPU %, the viewers' CPU % together) per window. ``train_cpus`` confines the
    training to those cores (with as many torch threads), as a GPU run leaves the other cores idle."""
    import psutil

    cpu_log = [] if cpu_log is None else cpu_log
    work = base / "train"
    work.mkdir()
    env = dict(os.environ)
    env.setdefault("SPYKE_CACHE", str(Path(tempfile.gettempdir()) / "spyke-bench-cache"))
    if train_cpus:
        env["OMP_NUM_THREADS"] = str(len(train_cpus))
    proc = subprocess.Popen([EXE, "demo", "--headless", "--max_train_epochs=10000", "--save_every_n_steps=100000"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, train_cpus)) if train_cpus else None)
    results = []
    try:
        events = None
        deadline = time.time() + 300
        while events is None and time.time() < deadline:
            found = list(work.glob("spyke-demo-output/*/.spyke/*/events.jsonl"))
            if found and b'"type":"step"' in found[0].read_bytes():
                events = found[0]
            time.sleep(0.5)
        if events is None:
            raise RuntimeError("the demo run did not start")
        time.sleep(5)                       # warm up
        trainer = psutil.Process(proc.pid)
        for viewers in [0, 3] * pairs + [0]:
            sessions = []
            for k in range(viewers):
                name = f"bench-view-{os.getpid()}-{k}"
                tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50",
                     f"exec {EXE} attach --read-only {events.parent}")
                sessions.append(name)
            time.sleep(3)                   # viewers loaded
            watched = [trainer] + [psutil.Process(pane_pid(name)) for name in sessions]
            c0 = [_cpu_seconds(p) for p in watched]
            t_from = time.time()
            time.sleep(window)
            t_to = time.time()
            rate, n = step_rate(events, t_from, t_to)
            used = [100.0 * (_cpu_seconds(p) - c) / (t_to - t_from) for p, c in zip(watched, c0)]
            cpu_log.append((viewers, used[0], sum(used[1:])))
            for name in sessions:
                tmux("kill-session", "-t", name, check=False)
            if n < 2:
                print(f"the demo run stopped stepping (see {events}); windows so far only")
                break
            results.append((viewers, rate, n))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def paired_ratio(results: list[tuple[int, float]]) -> str:
    """Each 3-viewer window against the mean of the 0-viewer windows either side: mean ± standard error."""
    ratios = [results[i][1] / ((results[i - 1][1] + results[i + 1][1]) / 2)
              for i in range(1, len(results) - 1) if results[i][0] == 3 and results[i - 1][1] and results[i + 1][1]]
    if not ratios:
        return "n/a"
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return f"{statistics.mean(ratios):.3f} ± {se:.3f} (standard error, {len(ratios)} pairs: " \
           f"{', '.join(f'{r:.3f}' for r in ratios)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-screen", action="store_true", help="only the training-with-viewers part")
    parser.add_argument("--pairs", type=int, default=8, help="3-viewer windows (each between two 0-viewer ones)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--train-cpus", default="", metavar="LIST",
                        help="confine the training to these cores, e.g. 0 (a GPU run leaves the others idle)")
    ns = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is needed (apt-get install tmux)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="spyke-bench-attach-"))
    try:
        if not ns.skip_screen:
            t = time.perf_counter()
            run_dir = make_run(base / "finished", ns.steps, pid=1 << 22, finished=True)
            size = (run_dir / "events.jsonl").stat().st_size
            print(f"events.jsonl: {ns.steps:,} step records, {size / 1e6:.0f} MB (written in {time.perf_counter() - t:.1f} s)")
            from cockpit.viewer.snapshot import load_snapshot

            t = time.perf_counter()
            load_snapshot(run_dir / "events.jsonl")
            print(f"snapshot alone (in process): {time.perf_counter() - t:.3f} s")
            written = [first_screen_written(run_dir, ns.steps, 20, base) for _ in range(ns.repeats)]
            print(f"first full screen written (launch -> 'step {ns.steps}/{ns.steps}' + checkpoint table on the tty): "
                  f"median {statistics.median(written):.2f} s  (runs: {', '.join(f'{x:.2f}' for x in written)})")
            times = [first_screen(run_dir, ns.steps, 20) for _ in range(ns.repeats)]
            print(f"first full screen seen by capture-pane polling every 10 ms: "
                  f"median {statistics.median(times):.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times)})")
            cpu = tail_cpu(base, ns.steps)
            print(f"viewer CPU while tailing a live run (+20 steps/s): {cpu:.1f} % of a core")
        if not ns.skip_training:
            cpu_log: list = []
            train_cpus = {int(c) for c in ns.train_cpus.split(",") if c.strip()} or None
            if train_cpus:
                print(f"training confined to cores {sorted(train_cpus)} with {len(train_cpus)} torch thread(s)")
            results = training_with_viewers(base, ns.window, ns.pairs, cpu_log, train_cpus)
            for (viewers, rate, n), (_v, train_cpu, viewers_cpu) in zip(results, cpu_log):
                print(f"training with {viewers} viewers: {rate:.3f} steps/s ({n} steps); CPU % of a core: "
                      f"training {train_cpu:.0f}, viewers {viewers_cpu:.1f}")
            for v in (0, 3):
                train = [t for n, t, _ in cpu_log if n == v]
                if train:
                    print(f"mean CPU with {v} viewers: training {statistics.mean(train):.1f} %, viewers "
                          f"{statistics.mean(c for n, _, c in cpu_log if n == v):.1f} % (of one core)")
            print(f"3 viewers / 0 viewers, steps/s: {paired_ratio(results)}")
            print(f"3 viewers / 0 viewers, training's CPU time: {paired_ratio([(v, c) for v, c, _ in cpu_log])}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
