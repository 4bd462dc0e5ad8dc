"""Snapshot tests (pytest-textual-snapshot): the form, and a mid-run screen with fixed clock and data at
80×24, 120×40 and 200×50 (the form hides itself on Start below 140 columns)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cockpit.app import CockpitApp
from tests.fakes import FakeSource
from engine.events import (CheckpointSaved, LogMessage, MemorySample, PhaseChanged, RunStarted, SamplesSaved,
                           StepCompleted, ValidationLoss)
from tests.test_cockpit_app import T0, fake_plan, valid_config

SIZE = (120, 40)
NO_PRESETS = Path(__file__).resolve().parent / "no-presets-here"


def make() -> CockpitApp:
    return CockpitApp(FakeSource(), config=valid_config(), clock=lambda: T0 + 140, planner=fake_plan,
                      presets_dir=NO_PRESETS)


async def wait_ready(pilot) -> None:
    app = pilot.app
    for _ in range(200):
        if app.form.ready:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.6)            # debounced preview
    await app.workers.wait_for_complete()
    await pilot.pause()


def test_form_snapshot(snap_compare):
    assert snap_compare(make(), terminal_size=SIZE, run_before=wait_ready)


def mid_run_events(steps: int = 250) -> list:
    """A fixed run: 400 steps over 4 epochs, a save (with validation and 3 samples) every 50 steps."""
    events = [RunStarted(run_id="r1", output_dir="/out", output_name="plasma", total_steps=400, num_epochs=4,
                         batches_per_epoch=100, device="cuda:0", pid=1, config={},
                         checkpoint_steps=list(range(50, 401, 50)), t=T0),
              PhaseChanged(phase="caching", detail="0/12", t=T0 + 2),
              PhaseChanged(phase="training", t=T0 + 5)]
    for i in range(1, steps + 1):
        loss = 0.3 / (1 + i / 50) + 0.02 * ((i * 7919) % 13) / 13
        events.append(StepCompleted(step=i, epoch=1 + (i - 1) // 100, loss=loss,
                                    lrs={"unet": 1e-4 * (1 - i / 400), "text_encoder": 5e-5 * (1 - i / 400)},
                                    step_seconds=0.5, t=T0 + 5 + i * 0.5))
        if i % 50 == 0:
            path = f"/out/plasma-step{i:08d}.safetensors"
            t = T0 + 5 + i * 0.5
            events += [CheckpointSaved(path=path, step=i, epoch=1 + (i - 1) // 100, bytes=9_650_000, kind="step",
                                       loss=loss, verified=True, state_dir=f"/out/plasma-step{i:08d}-state", t=t),
                       ValidationLoss(step=i, epoch=1 + (i - 1) // 100, loss=0.2 - 0.0004 * i + 0.000002 * i * i,
                                      images=4, checkpoint=path, t=t),
                       SamplesSaved(step=i, epoch=1 + (i - 1) // 100,
                                    paths=[f"/out/sample/plasma_{i:06d}_{k:02d}.png" for k in range(3)],
                                    prompts=["a", "b", "c"], seeds=[1, 2, 3], checkpoint=path, seconds=4.2, t=t)]
    events += [MemorySample(device="cuda:0", rss=3 * 2**30, sys_used=10 * 2**30, sys_available=6 * 2**30,
                            sys_total=16 * 2**30, allocated=(4 + k % 3) * 2**30, reserved=7 * 2**30,
                            peak=7 * 2**30 + 1, device_total=8 * 2**30, t=T0 + 80 + k) for k in range(30)]
    events.append(LogMessage(level="warning", message="step 120: loss spike (2.1× the EMA)", t=T0 + 66))
    return events


async def mid_run(pilot) -> None:
    await wait_ready(pilot)
    app = pilot.app
    await pilot.press("ctrl+r")
    await app.workers.wait_for_complete()
    app.source.emit(*mid_run_events())
    app.drain()
    await chart_caught_up(pilot)
    await settled_screen(pilot)


async def chart_caught_up(pilot) -> None:
    """While a run trains, the loss chart redraws at its own pace (once a second, or less often where a
    draw is costly): wait for the redraw that shows the events fed, as a person looking a moment later sees it."""
    import time

    from cockpit.panels import LossPanel

    panel = pilot.app.screen_stack[0].query_one(LossPanel)
    deadline = time.monotonic() + 2 * pilot.app._chart_pace.interval + 5
    while panel._plotted_version != pilot.app.state.version and time.monotonic() < deadline:
        await pilot.pause(0.1)


async def settled_screen(pilot, tries: int = 60) -> None:
    """Wait until two screenshots a moment apart are the same (the panels have caught up with the state) and
    no table still has columns to size, instead of a fixed pause that a loaded machine can outrun."""
    from textual.widgets import DataTable

    before = None
    for _ in range(tries):
        await pilot.pause(0.1)
        # a table sizes its columns to new rows when the app is next idle, which a busy machine puts off
        if any(t._require_update_dimensions for t in pilot.app.screen.query(DataTable)):
            before = None
            continue
        now = pilot.app.export_screenshot()
        if now == before:
            return
        before = now


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)], ids=["80x24", "120x40", "200x50"])
def test_mid_run_snapshot(snap_compare, size):
    assert snap_compare(make(), terminal_size=size, run_before=mid_run)
