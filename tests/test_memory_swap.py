"""Unified memory on MPS: the engine samples the MPS allocator (where torch has it) and swap (everywhere),
the reducer keeps the swap at the run's start and its growth, the memory panel turns yellow on that growth."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from textual.app import App
from textual.widgets import Static

from cockpit.memory_panel import MemoryPanel
from cockpit.memory_state import SWAP_GROWTH_WARN, swap_warning
from cockpit.state import CockpitState, reduce_all
from engine.events import MemorySample, RunStarted

GB = 2**30
MiB = 2**20


def started() -> RunStarted:
    return RunStarted(run_id="r", output_dir="/out", output_name="n", total_steps=10, num_epochs=1,
                      batches_per_epoch=10, device="mps", pid=1, config={}, checkpoint_steps=[10])


def mps_sample(swap: int | None, allocated: int = 6 * GB, driver: int = 9 * GB) -> MemorySample:
    return MemorySample(device="mps", rss=2 * GB, sys_used=10 * GB, sys_available=6 * GB, sys_total=16 * GB,
                        allocated=allocated, reserved=driver, device_total=12 * GB, swap_used=swap)


def test_swap_growth_is_measured_from_the_runs_first_sample_and_turns_yellow_past_the_threshold():
    base = 3 * GB
    s = reduce_all(CockpitState(), [started(), mps_sample(base), mps_sample(base + SWAP_GROWTH_WARN)])
    assert s.swap_at_start == base and s.swap_growth == SWAP_GROWTH_WARN
    assert not swap_warning(s)                       # at the threshold: not yet
    s = reduce_all(s, [mps_sample(base + SWAP_GROWTH_WARN + MiB)])
    assert s.swap_at_start == base and swap_warning(s)
    s = reduce_all(s, [mps_sample(base + 100 * MiB)])    # swap given back: no longer yellow
    assert not swap_warning(s)


def test_a_new_run_takes_its_own_swap_baseline():
    s = reduce_all(CockpitState(), [started(), mps_sample(1 * GB), mps_sample(3 * GB)])
    assert swap_warning(s)
    s = reduce_all(s, [started(), mps_sample(3 * GB), mps_sample(3 * GB + 10 * MiB)])
    assert s.swap_at_start == 3 * GB and not swap_warning(s)


def test_samples_without_swap_keep_no_baseline():
    s = reduce_all(CockpitState(), [started(), mps_sample(None), mps_sample(None)])
    assert s.swap_at_start is None and s.swap_growth == 0 and not swap_warning(s)


class PanelApp(App):
    def compose(self):
        yield MemoryPanel(id="memory")


def render_panel(state: CockpitState) -> tuple[str, set[str]]:
    async def body():
        app = PanelApp()
        async with app.run_test(size=(60, 12)) as pilot:
            panel = app.query_one(MemoryPanel)
            panel.show(state, 0.0)
            await pilot.pause()
            return str(panel.query_one("#memory-text", Static).render()), set(panel.classes)
    return asyncio.run(body())


def test_mps_panel_shows_driver_memory_beside_the_allocation_and_swap_growth_in_yellow():
    calm = reduce_all(CockpitState(), [started(), mps_sample(2 * GB), mps_sample(2 * GB + 100 * MiB)])
    text, classes = render_panel(calm)
    assert "MPS current 6.0 GiB · driver 9.0 GiB" in text
    assert "swap 2.1 GiB (+100.0 MiB since start)" in text and "⚠" not in text
    assert "-warn" not in classes
    spilling = reduce_all(calm, [mps_sample(2 * GB + SWAP_GROWTH_WARN + 200 * MiB)])
    text, classes = render_panel(spilling)
    assert "since start)  ⚠ swapping" in text
    assert "-warn" in classes and "-critical" not in classes


def test_engine_samples_the_mps_allocator_and_swap_where_torch_has_them(monkeypatch):
    import psutil
    import torch

    from engine import devices
    from engine.train.loop import memory_sample

    monkeypatch.setattr(devices, "mps_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 5 * GB, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 7 * GB, raising=False)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 12 * GB, raising=False)
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(used=3 * GB, total=8 * GB))
    m = memory_sample("mps")
    assert (m.device, m.allocated, m.reserved, m.device_total, m.swap_used) == ("mps", 5 * GB, 7 * GB, 12 * GB,
                                                                                3 * GB)
    # an older torch without driver_allocated_memory / recommended_max_memory: those read as unknown
    monkeypatch.delattr(torch.mps, "driver_allocated_memory")
    monkeypatch.delattr(torch.mps, "recommended_max_memory")
    m = memory_sample("mps")
    assert (m.allocated, m.reserved, m.device_total) == (5 * GB, None, None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_swap_is_sampled_on_every_device_and_an_unreadable_swap_is_unknown(monkeypatch, device):
    import psutil

    from engine.train.loop import memory_sample

    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(used=123 * MiB, total=GB))
    assert memory_sample(device).swap_used == 123 * MiB

    def broken():
        raise OSError("no /proc/swaps")
    monkeypatch.setattr(psutil, "swap_memory", broken)
    assert memory_sample(device).swap_used is None
