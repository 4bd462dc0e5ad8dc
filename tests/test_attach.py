"""``spyke-cockpit attach`` and ``ls``: the cockpit rebuilt from a run folder.

Synthetic runs (events written exactly as the engine writes them) pin the snapshot/tail
logic; one real tiny-model run proves that viewers attached to a live run see its steps,
steer it through the control channel (pause seen in events.jsonl), and that a finished
run reloads to the same loss history and checkpoint list the live cockpit showed.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import psutil
import pytest

from cockpit.attach import make_app
from cockpit.viewer.snapshot import load_snapshot
from cockpit.viewer.tail import TailSource
from engine.run.registry import resolve_run
from cockpit.state import CockpitState, HistoryLoaded, reduce_all
from engine.errors import SpykeError
from engine.events import (CheckpointSaved, LogMessage, MemorySample, PhaseChanged, RunFinished, RunStarted,
                           StepCompleted)

# ---------------------------------------------------------------------------- helpers


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def synthetic_events(n_steps: int, *, pid: int, finished: str | None = "completed", t0: float | None = None,
                     pause_at: int | None = None, nan_every: int = 0) -> list:
    """A run's events in engine order: start, phases, steps with memory samples, checkpoints, logs."""
    t0 = time.time() - 1000 if t0 is None else t0
    events: list = [RunStarted(run_id="syn-run", output_dir="/o", output_name="syn", total_steps=n_steps,
                               num_epochs=2, batches_per_epoch=n_steps // 2, device="cpu", pid=pid, config={},
                               checkpoint_steps=[n_steps // 2, n_steps], t=t0),
                    LogMessage(level="warning", message="a plan warning", t=t0),
                    PhaseChanged(phase="loading", detail="tiny", t=t0),
                    PhaseChanged(phase="training", t=t0 + 1)]
    for i in range(1, n_steps + 1):
        t = t0 + 1 + i * 0.05
        skipped = bool(nan_every) and i % nan_every == 0
        loss = math.nan if skipped else 0.3 + 0.5 * math.sin(i / 7.0) ** 2
        events.append(StepCompleted(step=i, epoch=1 + (i > n_steps // 2), loss=loss,
                                    lrs={"unet": 1e-4 * (1 - i / n_steps), "text_encoder": 5e-5}, step_seconds=0.05,
                                    skipped=skipped, t=t))
        if i % 40 == 0:
            events.append(MemorySample(device="cpu", rss=i << 20, sys_used=1 << 30, sys_available=3 << 30,
                                       sys_total=4 << 30, t=t))
        if i in (n_steps // 2, n_steps):
            events += [PhaseChanged(phase="saving", t=t),
                       CheckpointSaved(path=f"/o/syn-{i:06d}.safetensors", step=i, epoch=1, bytes=1000 + i,
                                       kind="step" if i < n_steps else "final", loss=loss, verified=True, t=t),
                       PhaseChanged(phase="training", t=t)]
        if pause_at == i:
            events += [LogMessage(level="info", message="control: pause from attach", t=t),
                       PhaseChanged(phase="paused", t=t)]
    if finished:
        events += [PhaseChanged(phase="finished", detail=finished, t=t0 + 2 + n_steps * 0.05),
                   RunFinished(status=finished, step=n_steps, final_path=f"/o/syn-{n_steps:06d}.safetensors",
                               t=t0 + 2 + n_steps * 0.05)]
    return events


def write_run(root: Path, events: list, run_id: str = "syn-run", tail: str = "") -> Path:
    run_dir = root / "out" / ".spyke" / run_id
    (run_dir / "control").mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    with open(run_dir / "events.jsonl", "w") as fh:
        for e in events:
            fh.write(e.to_json() + "\n")
        fh.write(tail)
    return run_dir


def assert_same_view(a: CockpitState, b: CockpitState) -> None:
    """What the panels show: progress, loss history + EMA, checkpoints, memory, log."""
    for name in ("status", "phase", "run_id", "total_steps", "step", "epoch", "paused", "skipped_steps",
                 "checkpoints", "memory", "memory_history", "log", "lrs", "rate_window", "final_path",
                 "checkpoint_steps"):
        assert getattr(a, name) == getattr(b, name), name
    assert (a.loss is None and b.loss is None) or a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss))
    assert a.loss_ema == pytest.approx(b.loss_ema, rel=1e-12)
    ha, hb = a.history, b.history
    assert (ha.steps, ha.counts, ha.bucket_size, ha.total) == (hb.steps, hb.counts, hb.bucket_size, hb.total)
    assert ha.sums == pytest.approx(hb.sums, rel=1e-12)


def collect(source: TailSource) -> tuple[list, threading.Lock]:
    got: list = []
    lock = threading.Lock()

    def deliver(event) -> None:
        with lock:
            got.append(event)
    source.start(None, deliver)
    return got, lock


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- snapshot == live reducer


@pytest.mark.parametrize("finished", ["completed", "aborted", None])
def test_snapshot_rebuilds_what_the_live_cockpit_showed(tmp_path, finished):
    events = synthetic_events(3000, pid=dead_pid(), finished=finished, pause_at=2999 if finished is None else None,
                              nan_every=97)
    live = reduce_all(CockpitState(), events)
    assert live.history.bucket_size > 1                      # the history compacted (3000 > 2048 buckets)
    run_dir = write_run(tmp_path, events, tail='{"v":1,"type":"step","t":1,"st')     # torn last line
    snap = load_snapshot(run_dir / "events.jsonl")
    assert snap.exact and isinstance(snap.actions[-1], HistoryLoaded)
    assert len(snap.actions) < 120                           # a handful of records, not one per step
    assert_same_view(reduce_all(CockpitState(), snap.actions), live)


def test_big_file_gets_a_coarse_history_at_once_then_the_exact_one(tmp_path):
    events = synthetic_events(3000, pid=dead_pid(), nan_every=61)
    live = reduce_all(CockpitState(), events)
    run_dir = write_run(tmp_path, events)
    snap = load_snapshot(run_dir / "events.jsonl", exact_limit=0)
    assert not snap.exact
    coarse = reduce_all(CockpitState(), snap.actions)
    assert coarse.step == live.step and coarse.checkpoints == live.checkpoints
    assert coarse.history.total == pytest.approx(live.history.total, rel=0.05)
    xs, ys, _ = coarse.history.series(50)
    lx, ly, _ = live.history.series(50)
    assert abs(sum(ys) / len(ys) - sum(ly) / len(ly)) < 0.05       # the same curve, coarsely
    source = TailSource(run_dir, exact_limit=0, exact_delay=0)
    got, lock = collect(source)
    assert source.wait(30)
    exact = [a for a in got if isinstance(a, HistoryLoaded)]
    assert [a.exact for a in exact] == [False, True]
    assert_same_view(reduce_all(CockpitState(), got), live)


def test_a_resumed_run_starts_over_at_its_last_run_started(tmp_path):
    first = synthetic_events(50, pid=dead_pid(), finished="aborted")
    second = synthetic_events(80, pid=dead_pid(), finished="completed")
    run_dir = write_run(tmp_path, first + second)
    state = reduce_all(CockpitState(), load_snapshot(run_dir / "events.jsonl").actions)
    assert_same_view(state, reduce_all(CockpitState(), first + second))
    assert state.history.total == 80


# ---------------------------------------------------------------------------- prefetch (snapshot in a forked child)

PREFETCH_CHILD = r"""
import asyncio, os, sys, threading, time
from pathlib import Path
import psutil
from cockpit.viewer.prefetch import SnapshotPrefetch
from cockpit.viewer.snapshot import load_snapshot
from cockpit.viewer.tail import TailSource
from cockpit.state import CockpitState, reduce_all

run_dir, total = Path(sys.argv[1]), int(sys.argv[2])
path = run_dir / "events.jsonl"
assert threading.active_count() == 1

# 1. the child's snapshot is the one this process would load (coarse history included)
for limit in (1 << 30, 0):
    pre = SnapshotPrefetch(path, exact_limit=limit)
    assert pre.ready(timeout=20), "the child never answered"
    got, want = pre.result(), load_snapshot(path, exact_limit=limit)
    assert got is not None and (got.offset, got.exact, got.steps_start) == (want.offset, want.exact, want.steps_start)
    a, b = reduce_all(CockpitState(), got.actions), reduce_all(CockpitState(), want.actions)
    assert (a.step, a.checkpoints, a.history.steps, a.history.sums, a.loss_ema) == \
           (b.step, b.checkpoints, b.history.steps, b.history.sums, b.loss_ema)
    assert psutil.Process().children() == [], "the child was not reaped"

# 2. a child that fails (no such file) gives None; one dropped unread is reaped
assert SnapshotPrefetch(run_dir / "missing.jsonl").result() is None
pre = SnapshotPrefetch(path)
pre.close()
assert psutil.Process().children() == []

# 3. the viewer folds a ready prefetch in before its first frame: the run is there at mount
from cockpit.attach_app import AttachApp
from cockpit.panels import LossPlot
charted = []                      # steps in the history each time the chart is drawn
draw = LossPlot.render
def render(self):
    charted.append(self.state.history.total if self.state is not None else 0)
    return draw(self)
LossPlot.render = render
pre = SnapshotPrefetch(path)
assert pre.ready(timeout=20)
app = AttachApp(TailSource(run_dir, read_only=True, prefetch=pre), read_only=True)

async def go():
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.pause(0.2)
        await pilot.press("q")

asyncio.run(go())
assert app.state.step == total and len(app.state.checkpoints) == 2
assert charted and charted[0] > 0.9 * total, f"the first frame was not the full one: {charted}"
assert psutil.Process().children() == []
print("prefetch ok")
"""


def test_prefetched_snapshot_matches_and_is_on_the_first_frame(tmp_path):
    # a fresh interpreter: the prefetch will not fork a process that has threads (pytest's may)
    run_dir = write_run(tmp_path, synthetic_events(3000, pid=dead_pid(), finished="completed", nan_every=89))
    out = subprocess.run([sys.executable, "-c", PREFETCH_CHILD, str(run_dir), "3000"], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefetch ok" in out.stdout


# ---------------------------------------------------------------------------- live / stale / finished sources


def test_attach_to_a_live_run_receives_new_steps(tmp_path):
    events = synthetic_events(100, pid=os.getpid(), finished=None, t0=time.time())
    run_dir = write_run(tmp_path, events)
    source = TailSource(run_dir, poll_interval=0.05)
    got, lock = collect(source)
    assert source.running
    full = synthetic_events(130, pid=os.getpid(), finished="completed", t0=time.time())
    first_new = next(i for i, e in enumerate(full) if isinstance(e, StepCompleted) and e.step == 101)
    more = full[first_new:]
    with open(run_dir / "events.jsonl", "a") as fh:
        for e in more:
            line = e.to_json() + "\n"
            fh.write(line[:10])                                 # a reader may see half a line
            fh.flush()
            fh.write(line[10:])
    assert source.wait(10)
    with lock:
        state = reduce_all(CockpitState(), got)
    assert state.status == "completed" and state.step == 130
    assert state.history.total == 130


def test_stale_run_opens_as_history_and_commands_say_it_is_not_running(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(60, pid=dead_pid(), finished=None))
    source = TailSource(run_dir)
    got, _ = collect(source)
    assert source.stale and not source.running
    state = reduce_all(CockpitState(), got)
    assert state.status == "failed" and "stale" in state.error and state.step == 60
    with pytest.raises(SpykeError, match=r"run syn-run is not running"):
        source.pause()
    assert list((run_dir / "control").iterdir()) == []


def test_finished_run_refuses_control_with_a_clear_message(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(20, pid=os.getpid(), finished="completed"))
    source = TailSource(run_dir)
    collect(source)
    assert not source.running
    with pytest.raises(SpykeError, match=r"run syn-run is not running \(it finished\)"):
        source.abort(save=True)


def test_read_only_source_refuses_control(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(20, pid=os.getpid(), finished=None, t0=time.time()))
    source = TailSource(run_dir, read_only=True)
    collect(source)
    try:
        for command in (source.pause, source.resume, source.save, lambda: source.abort(False)):
            with pytest.raises(SpykeError, match="read-only"):
                command()
        assert list((run_dir / "control").iterdir()) == []
    finally:
        source.stop()


def test_commands_are_owner_only_files(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(20, pid=os.getpid(), finished=None, t0=time.time()))
    source = TailSource(run_dir, sender="test viewer")
    collect(source)
    try:
        source.pause()
        source.save()
    finally:
        source.stop()
    files = sorted((run_dir / "control").iterdir())
    assert [json.loads(f.read_text())["command"] for f in files] == ["pause", "save"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert json.loads(files[0].read_text())["sender"] == "test viewer"


# ---------------------------------------------------------------------------- the app on a run folder


def run_app(app, steps):
    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            for step in steps:
                await step(pilot)
    asyncio.run(go())


def test_app_opens_a_finished_run_as_history_and_quits_at_once(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(300, pid=dead_pid(), finished="completed"))
    app = make_app(run_dir)
    seen = {}

    async def look(pilot):
        await pilot.pause(0.6)
        seen["state"] = app.state
        seen["screen"] = app.export_screenshot()
        await pilot.press("space")
        await pilot.pause(0.1)
        seen["notes"] = [n.message for n in app._notifications]
        await pilot.press("q")
        await pilot.pause(0.1)

    run_app(app, [look])
    state = seen["state"]
    assert state.status == "completed" and state.step == 300 and len(state.checkpoints) == 2
    assert "step 300/300" in seen["screen"].replace("&#160;", " ")
    assert any("not running" in n for n in seen["notes"])
    assert app.return_code == 0
    assert list((run_dir / "control").iterdir()) == []


def test_a_finished_run_or_a_read_only_viewer_hides_the_run_keys_and_says_why_in_the_title(tmp_path):
    from textual.widgets._footer import FooterKey

    finished = write_run(tmp_path / "a", synthetic_events(30, pid=dead_pid(), finished="completed"))
    live = write_run(tmp_path / "b", synthetic_events(30, pid=os.getpid(), finished=None, t0=time.time()))
    seen = {}
    for label, app in (("finished", make_app(finished)), ("read-only", make_app(live, read_only=True)),
                       ("live", make_app(live))):
        async def look(pilot, app=app, label=label):
            await pilot.pause(0.6)
            seen[label] = ({k.description for k in app.screen.query(FooterKey)}, app.sub_title,
                           app.check_action("toggle_pause", ()))
            app.exit(0)
        run_app(app, [look])
    for label in ("finished", "read-only"):
        keys, title, check = seen[label]
        assert not keys & {"Pause/Resume", "Save now", "Abort"} and {"Help", "Quit"} <= keys, label
        assert title.startswith(label) and check is False, label
    keys, title, check = seen["live"]
    assert {"Pause/Resume", "Save now", "Abort"} <= keys and check is True and title.startswith("attach")


def test_quitting_a_viewer_of_a_paused_run_reminds_that_it_stays_paused(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(30, pid=os.getpid(), finished=None, t0=time.time(), pause_at=30))
    app = make_app(run_dir)
    seen = {}

    async def quit_twice(pilot):
        await pilot.pause(0.6)
        assert app.state.paused
        await pilot.press("q")
        await pilot.pause(0.1)
        seen["running"] = app.is_running
        seen["notes"] = [n.message for n in app._notifications]
        await pilot.press("q")
        await pilot.pause(0.1)

    run_app(app, [quit_twice])
    assert seen["running"]
    assert any("the run stays PAUSED; press space in any viewer to resume" in n for n in seen["notes"])
    assert app.return_code == 0 and list((run_dir / "control").iterdir()) == []     # nothing sent to the run


@pytest.mark.parametrize("read_only", [False, True])
def test_app_keys_steer_a_live_run_unless_read_only(tmp_path, read_only):
    run_dir = write_run(tmp_path, synthetic_events(50, pid=os.getpid(), finished=None, t0=time.time()))
    app = make_app(run_dir, read_only=read_only)
    notes = []

    async def keys(pilot):
        await pilot.pause(0.6)
        assert app.state.running and app.state.step == 50
        await pilot.press("space")
        await pilot.pause(0.1)
        await pilot.press("s")
        await pilot.pause(0.1)
        notes.extend(n.message for n in app._notifications)
        await pilot.press("q")
        await pilot.pause(0.1)
        if not read_only:                       # the pause asked for stays: quitting says so first
            assert app.is_running and any("the run stays PAUSED" in n.message for n in app._notifications)
            await pilot.press("q")

    run_app(app, [keys])
    sent = sorted(json.loads(f.read_text())["command"] for f in (run_dir / "control").iterdir())
    if read_only:
        assert sent == [] and any("read-only" in n for n in notes)
        assert app.check_action("toggle_pause", ()) is False           # the keys are hidden
        assert app.sub_title.startswith("read-only")
    else:
        assert sent == ["pause", "save"]
    assert app.return_code == 0                                          # quitting a viewer leaves the run alone


# ---------------------------------------------------------------------------- finding runs, ls


def test_resolve_run_picks_the_latest_live_run_or_a_named_one(tmp_path):
    old = write_run(tmp_path / "a", synthetic_events(5, pid=dead_pid(), finished="completed"), run_id="old-run")
    live = write_run(tmp_path / "b", synthetic_events(5, pid=os.getpid(), finished=None, t0=time.time() - 5),
                     run_id="live-run")
    assert resolve_run(None, str(tmp_path)) == live
    assert resolve_run("old-run", str(tmp_path)) == old
    assert resolve_run(str(old / "events.jsonl")) == old
    assert resolve_run(str(tmp_path / "a")) == old
    with pytest.raises(SpykeError, match="no such run"):
        resolve_run("nope", str(tmp_path))
    with pytest.raises(SpykeError, match="no runs under"):
        resolve_run(None, str(tmp_path / "a" / "out" / "nothing-here"))


def test_attach_to_a_folder_whose_events_are_garbage_says_it_is_not_a_run(tmp_path):
    run_dir = tmp_path / "out" / ".spyke" / "notarun"
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text("".join(f"line {i} of some other log\n" for i in range(11)) + "no newline")
    want = f"{run_dir / 'events.jsonl'}: not a spyke-cockpit run (0 of 12 lines readable)"
    for typed in (run_dir, run_dir / "events.jsonl"):
        with pytest.raises(SpykeError) as info:
            resolve_run(str(typed))
        assert str(info.value) == want
    with pytest.raises(SpykeError, match="0 of 12 lines readable"):
        resolve_run("notarun", str(tmp_path))                         # by run id under a root
    out = subprocess.run([sys.executable, "-m", "cockpit.cli", "attach", str(run_dir)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", f"spyke-cockpit: error: {want}\n")


def test_attach_accepts_a_live_run_with_a_torn_last_line_or_one_still_starting(tmp_path):
    live = write_run(tmp_path, synthetic_events(3, pid=os.getpid(), finished=None, t0=time.time() - 5),
                     tail='{"v":1,"type":"step","t":')
    assert resolve_run(str(live)) == live
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "events.jsonl").write_text("")
    assert resolve_run(str(starting)) == starting
    (starting / "events.jsonl").write_text('{"v":1,"type":"run_started","t":1,"run_id":"x')  # first line half out
    assert resolve_run(str(starting)) == starting
    damaged = write_run(tmp_path / "d", synthetic_events(3, pid=dead_pid()))
    with open(damaged / "events.jsonl", "r+b") as fh:
        fh.write(b"\x00garbage")                                     # the first line is torn, the rest reads
    assert resolve_run(str(damaged)) == damaged


def test_runs_root_comes_from_the_env_or_the_user_config_file(tmp_path, monkeypatch):
    from cockpit.ls import main as ls_main
    from engine.run.registry import default_runs_root, user_config_path

    here, root = tmp_path / "somewhere-else", tmp_path / "loras"
    here.mkdir()
    live = write_run(root / "plasma", synthetic_events(5, pid=os.getpid(), finished=None, t0=time.time() - 5))
    monkeypatch.chdir(here)
    assert default_runs_root() == here                           # nothing configured: the current folder
    cfg = user_config_path()
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'runs_root = "{root}"\n')
    assert default_runs_root() == root
    assert resolve_run(None) == live                             # `attach` with no argument, from anywhere
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert ls_main(["--json"]) == 0
    assert [json.loads(line)["run_dir"] for line in buf.getvalue().splitlines()] == [str(live)]
    (cfg.parent / "rel").mkdir()
    cfg.write_text('runs_root = "rel"\n')                       # relative to the config file's folder
    assert default_runs_root() == cfg.parent / "rel"
    monkeypatch.setenv("SPYKE_RUNS_ROOT", str(here))             # the environment wins over the file
    assert default_runs_root() == here
    monkeypatch.setenv("SPYKE_RUNS_ROOT", str(tmp_path / "gone"))
    with pytest.raises(SpykeError, match=r"\$SPYKE_RUNS_ROOT: .*gone is not a folder"):
        default_runs_root()
    monkeypatch.delenv("SPYKE_RUNS_ROOT")
    for text, message in [('runs_root = "~/x', "cannot read it"),
                          ('run_root = "/tmp"', "unknown setting 'run_root'"),
                          ("runs_root = 3", "runs_root must be a folder path"),
                          (f'runs_root = "{tmp_path / "nope"}"', "nope is not a folder")]:
        cfg.write_text(text + "\n")
        with pytest.raises(SpykeError) as err:
            default_runs_root()
        assert message in str(err.value) and str(cfg) in str(err.value) and "\n" not in str(err.value)


def test_refresh_sets_the_viewer_pace_and_bad_values_are_refused(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(50, pid=os.getpid(), finished=None, t0=time.time()))
    app = make_app(run_dir, read_only=True, refresh=0.25, idle_cpu=lambda: None)   # pace: as asked
    painted = []

    async def watch(pilot):
        await pilot.pause(0.3)
        with open(run_dir / "events.jsonl", "a") as fh:       # the run goes on: 10 more steps
            for i in range(51, 61):
                fh.write(StepCompleted(step=i, epoch=2, loss=0.4, lrs={}, step_seconds=0.05).to_json() + "\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            painted.append(app.export_screenshot().replace("&#160;", " "))
            if "step 60/50" in painted[-1]:                    # tailed steps past the planned total still show
                break
        await pilot.press("q")

    run_app(app, [watch])
    assert app.refresh_seconds == 0.25 and app.state.step == 60
    assert "step 60/50" in painted[-1]
    for bad in ("0", "-1", "61", "soon"):
        out = subprocess.run([sys.executable, "-m", "cockpit.cli", "attach", str(run_dir), "--refresh", bad],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
        assert out.returncode == 2 and f"'{bad}' is not a number of seconds from 0.25 to 60" in out.stderr


def test_a_viewer_backs_off_while_the_cpu_is_busy_and_returns_when_a_core_is_free(tmp_path):
    run_dir = write_run(tmp_path, synthetic_events(50, pid=os.getpid(), finished=None, t0=time.time()))
    measured = iter([0.2, 0.8, 3.0])          # idle cores: busy, still busy (hysteresis), calm
    seen = []                                 # the pace in force over each interval that was measured

    def idle_cpu():
        seen.append((app.refresh_seconds, app.source.poll_interval, app.sub_title, time.monotonic()))
        return next(measured, 3.0)

    app = make_app(run_dir, read_only=True, refresh=0.25, idle_cpu=idle_cpu)
    base_poll = app.source.poll_interval

    async def watch(pilot):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(seen) < 4:
            await pilot.pause(0.05)
        await pilot.press("q")

    run_app(app, [watch])
    assert [s[0] for s in seen[:4]] == [0.25, 1.25, 1.25, 0.25]      # busy: redraws 5x less often, then back
    assert [s[1] for s in seen[:4]] == [base_poll, 1.0, 1.0, base_poll]  # the events file: once a second
    assert seen[2][3] - seen[1][3] >= 1.2                             # the busy interval really was longer
    assert "CPU busy: redraw every 1.25 s" in seen[1][2] and "CPU busy" not in seen[3][2]
    assert all("read-only" in s[2] for s in seen[:4])


def test_cli_names_a_broken_user_config_in_one_line(tmp_path):
    from engine.run.registry import user_config_path

    cfg = user_config_path()
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("runs_root = [\n")
    for command in (["ls"], ["attach"]):
        out = subprocess.run([sys.executable, "-m", "cockpit.cli", *command], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, timeout=60)
        assert out.returncode == 2 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and str(cfg) in lines[0] and "cannot read it" in lines[0], out.stderr


def test_ls_lists_states_including_stale(tmp_path):
    from cockpit.ls import main as ls_main

    gone = dead_pid()
    write_run(tmp_path, synthetic_events(40, pid=gone, finished="completed"), run_id="r-finished")
    write_run(tmp_path, synthetic_events(40, pid=gone, finished="aborted"), run_id="r-aborted")
    write_run(tmp_path, synthetic_events(40, pid=gone, finished="failed"), run_id="r-failed")
    write_run(tmp_path, synthetic_events(40, pid=gone, finished=None), run_id="r-stale")
    born = psutil.Process().create_time()        # a run starts after its process does
    write_run(tmp_path, synthetic_events(40, pid=os.getpid(), finished=None, t0=born + 0.5), run_id="r-live")
    write_run(tmp_path, synthetic_events(40, pid=os.getpid(), finished=None, t0=born + 0.5, pause_at=40),
              run_id="r-paused")
    out = io.StringIO()
    with redirect_stdout(out):
        assert ls_main([str(tmp_path), "--json"]) == 0
    by_dir = {Path(r["run_dir"]).name: r for r in map(json.loads, out.getvalue().splitlines())}
    assert {k: v["state"] for k, v in by_dir.items()} == {
        "r-finished": "finished", "r-aborted": "aborted", "r-failed": "failed", "r-stale": "stale",
        "r-live": "live", "r-paused": "paused"}
    assert by_dir["r-stale"]["step"] == 40 and by_dir["r-stale"]["total"] == 40
    assert by_dir["r-live"]["pid"] == os.getpid()
    assert by_dir["r-finished"]["last_loss"] == pytest.approx(0.3 + 0.5 * math.sin(40 / 7.0) ** 2)
    table = io.StringIO()
    with redirect_stdout(table):
        ls_main([str(tmp_path)])
    assert "stale" in table.getvalue() and "40/40" in table.getvalue()


def test_ls_follows_a_resumed_run_to_its_new_process(tmp_path):
    """A resume appends a new run_started (new pid) to the same events.jsonl: ls must judge that pid."""
    from engine.run.registry import summarize

    first = synthetic_events(20, pid=dead_pid(), finished=None, t0=time.time() - 50)
    resumed = [RunStarted(run_id="syn-run", output_dir="/o", output_name="syn", total_steps=40, num_epochs=2,
                          batches_per_epoch=20, device="cpu", pid=os.getpid(), config={}, start_step=20,
                          t=psutil.Process().create_time() + 0.5)]
    info = summarize(write_run(tmp_path, first + resumed))
    assert (info.state, info.pid, info.step, info.total) == ("live", os.getpid(), 20, 40)
    info = summarize(write_run(tmp_path, first, run_id="not-resumed"))
    assert info.state == "stale"


# ---------------------------------------------------------------------------- a real run, several viewers


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from engine.tiny import build_tiny_model, generate_dataset

    root = tmp_path_factory.mktemp("attach_assets")
    build_tiny_model(root / "tiny-sd15")
    ds = generate_dataset(root / "small-dataset", num_images=4, num_repeats=1, resolution=64)
    return root, ds.dataset_toml


def tiny_config(assets, out_dir: Path, **overrides):
    from engine.demo import prepare_demo

    root, dataset_toml = assets
    values = dict(dataset_config=str(dataset_toml), resolution="64", max_train_steps=8, max_train_epochs=None,
                  save_every_n_steps=4, save_state=False, gradient_checkpointing=False, seed=1,
                  output_dir=str(out_dir))
    values.update(overrides)
    return prepare_demo(root, out_dir.parent, **values).validate()


def test_finished_real_run_reloads_to_what_the_live_cockpit_showed(tiny_assets, tmp_path):
    from engine.session import start_training

    live_events: list = []
    handle = start_training(tiny_config(tiny_assets, tmp_path / "out"), [live_events.append])
    assert handle.wait(120)
    live = reduce_all(CockpitState(), live_events)
    assert live.status == "completed" and len(live.checkpoints) >= 2
    run_dir = handle.run_dir
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "control").stat().st_mode) == 0o700
    source = TailSource(run_dir)
    got, _ = collect(source)
    assert not source.running
    assert_same_view(reduce_all(CockpitState(), got), live)


def test_two_viewers_watch_and_steer_a_live_run(tiny_assets, tmp_path):
    from engine.session import start_training

    handle = start_training(tiny_config(tiny_assets, tmp_path / "out", max_train_steps=400,
                                        save_every_n_steps=1000))
    try:
        wait_for(lambda: handle.run_dir is not None and (handle.run_dir / "events.jsonl").exists(), 60, "run folder")
        run_dir = handle.run_dir
        a, b = TailSource(run_dir, poll_interval=0.1), TailSource(run_dir, poll_interval=0.1, read_only=True)
        wait_for(lambda: b"run_started" in (run_dir / "events.jsonl").read_bytes(), 60, "run start")
        got_a, lock_a = collect(a)
        got_b, lock_b = collect(b)

        def steps(got, lock):
            with lock:
                return [e.step for e in got if isinstance(e, StepCompleted)]

        wait_for(lambda: len(steps(got_a, lock_a)) >= 2 and len(steps(got_b, lock_b)) >= 2, 60, "steps")
        with pytest.raises(SpykeError, match="read-only"):
            b.pause()
        a.pause()                                            # viewer A pauses the run through the control channel

        def paused(got, lock):
            with lock:
                return any(isinstance(e, PhaseChanged) and e.phase == "paused" for e in got)

        wait_for(lambda: paused(got_a, lock_a) and paused(got_b, lock_b), 30, "both viewers see the pause")
        text = (run_dir / "events.jsonl").read_text()
        assert '"phase":"paused"' in text and "control: pause from attach" in text
        frozen = len(steps(got_a, lock_a))
        time.sleep(0.6)
        assert len(steps(got_a, lock_a)) == frozen               # no steps while paused
        a.resume()
        wait_for(lambda: len(steps(got_b, lock_b)) > frozen + 1, 30, "steps after resume")
        a.abort(save=False)
        assert handle.wait(60)
        assert a.wait(10) and b.wait(10)
        for got, lock in ((got_a, lock_a), (got_b, lock_b)):
            with lock:
                fin = [e for e in got if isinstance(e, RunFinished)]
            assert [f.status for f in fin] == ["aborted"]
        with pytest.raises(SpykeError, match="is not running"):
            a.pause()
    finally:
        handle.control.abort(save=False)
        handle.wait(60)
