"""Snapshot tests (pytest-textual-snapshot): the form, and a mid-run screen with fixed clock and data."""

from __future__ import annotations

from pathlib import Path

from cockpit.app import CockpitApp
from tests.fakes import FakeSource
from engine.events import CheckpointSaved, LogMessage, MemorySample, PhaseChanged, RunStarted, StepCompleted
from tests.test_cockpit_app import T0, fake_plan, valid_config

SIZE = (120, 40)
NO_PRESETS = Path(__file__).resolve().parent / "no-presets-here"


def make() -> CockpitApp:
    return CockpitApp(FakeSource(), config=valid_config(), clock=lambda: T0 + 95, planner=fake_plan,
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


async def mid_run(pilot) -> None:
    await wait_ready(pilot)
    app = pilot.app
    await pilot.press("ctrl+r")
    await app.workers.wait_for_complete()
    events = [RunStarted(run_id="r1", output_dir="/out", output_name="plasma", total_steps=400, num_epochs=4,
                         batches_per_epoch=100, device="cuda:0", pid=1, config={}, checkpoint_steps=[100, 200, 400],
                         t=T0),
              PhaseChanged(phase="training", t=T0 + 5)]
    for i in range(1, 151):
        loss = 0.3 / (1 + i / 50) + 0.02 * ((i * 7919) % 13) / 13
        events.append(StepCompleted(step=i, epoch=1 + (i - 1) // 100, loss=loss,
                                    lrs={"unet": 1e-4, "text_encoder": 5e-5}, step_seconds=0.5,
                                    t=T0 + 5 + i * 0.5))
    events += [CheckpointSaved(path="/out/plasma-step00000100.safetensors", step=100, epoch=1, bytes=9_650_000,
                               kind="step", loss=0.1412, verified=True, t=T0 + 56),
               MemorySample(device="cuda:0", rss=3 * 2**30, sys_used=10 * 2**30, sys_available=6 * 2**30,
                            sys_total=16 * 2**30, allocated=5 * 2**30, reserved=7 * 2**30, peak=7 * 2**30 + 1,
                            device_total=8 * 2**30, t=T0 + 80),
               LogMessage(level="warning", message="step 120: loss spike (2.1× the EMA)", t=T0 + 66)]
    app.source.emit(*events)
    app.drain()
    await pilot.pause(1.3)            # the loss chart redraws at most once a second while training
    await pilot.pause()


def test_mid_run_snapshot(snap_compare):
    assert snap_compare(make(), terminal_size=SIZE, run_before=mid_run)
