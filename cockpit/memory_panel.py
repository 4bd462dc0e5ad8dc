"""The memory panel: pressure, the device's allocator (MPS: current beside driver-allocated; CUDA:
allocated, reserved, peak), swap, RSS and RAM, and a sparkline of the samples."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from cockpit.memory_state import SWAP_GROWTH_WARN, memory_pressure, swap_warning
from cockpit.panel_base import Panel
from cockpit.state import CockpitState
from engine.api import format_bytes

WARN_LEVEL = 0.85
CRITICAL_LEVEL = 0.95
BARS = " ▁▂▃▄▅▆▇█"


def memory_bars(values: tuple[int, ...] | list[int], total: int | None, width: int) -> str:
    """One bar per sample, the newest right, scaled to ``total`` (the machine's memory), not to the peak."""
    values = list(values)[-max(1, width):]
    if not values:
        return ""
    top = total if total and total > 0 else max(values) or 1
    return "".join(BARS[min(8, max(0, round(8 * v / top)))] if v > 0 else BARS[0] for v in values)


def swap_line(m: Any, growth: int) -> str:
    """``swap 2.1 GiB (+812.0 MiB since start)``, with a warning past the growth threshold."""
    sign = "+" if growth >= 0 else "−"
    line = f"swap {format_bytes(m.swap_used)} ({sign}{format_bytes(abs(growth))} since start)"
    return line + ("  ⚠ swapping" if growth > SWAP_GROWTH_WARN else "")


def memory_lines(m: Any, swap_growth: int = 0) -> list[str]:
    """The memory figures, the most needed first. On MPS: the allocation beside what the driver holds,
    then swap (unified memory's pressure); elsewhere swap shows only once it has grown past the threshold."""
    level = memory_pressure(m)
    lines = [f"pressure {level * 100:.0f}%" + ("  ⚠ near the limit" if level >= WARN_LEVEL else "")]
    dev = (m.device or "").lower()
    swap = getattr(m, "swap_used", None) is not None
    if dev.startswith("mps"):
        lines.append(f"MPS current {format_bytes(m.allocated)} · driver {format_bytes(m.reserved)}")
        if swap:
            lines.append(swap_line(m, swap_growth))
        lines.append(f"recommended max {format_bytes(m.device_total)}")
        swap = False
    elif dev.startswith("cuda"):
        lines.append(f"CUDA {format_bytes(m.allocated)} alloc · {format_bytes(m.reserved)} reserved")
        lines.append(f"peak {format_bytes(m.peak)} · total {format_bytes(m.device_total)}")
    else:
        lines.append(f"device {m.device or 'cpu'}")
    if swap and swap_growth > SWAP_GROWTH_WARN:
        lines.insert(1, swap_line(m, swap_growth))
    lines.append(f"RSS {format_bytes(m.rss)} · RAM {format_bytes(m.sys_used)} / {format_bytes(m.sys_total)}")
    lines.append(f"{format_bytes(m.sys_available)} RAM available")
    return lines


class MemoryPanel(Panel):
    PANEL_TITLE = "Memory"

    def compose(self) -> ComposeResult:
        yield Static("no samples yet", id="memory-text")
        yield Static("", id="memory-spark")

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        m = state.memory
        if m is None:
            return
        level = memory_pressure(m)
        self.query_one("#memory-text", Static).update("\n".join(memory_lines(m, state.swap_growth)), layout=False)
        # yellow: near the limit, or unified memory spilling to swap since the run started
        self.set_class((WARN_LEVEL <= level or swap_warning(state)) and level < CRITICAL_LEVEL, "-warn")
        self.set_class(level >= CRITICAL_LEVEL, "-critical")
        # the history holds device memory where the device reports it, else the process's RSS
        total = m.device_total if m.allocated is not None else m.sys_total
        spark = self.query_one("#memory-spark", Static)
        spark.update(Text(memory_bars(state.memory_history, total, spark.size.width or 40), style="blue"),
                     layout=False)
        subtitle = f"bars scaled to {format_bytes(total)}" if total else ""
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle
