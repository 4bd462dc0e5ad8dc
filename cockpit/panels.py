"""Live panels. Each renders a :class:`cockpit.state.CockpitState`; none holds run data of its own.

``show(state, now)`` is cheap when nothing changed (the state's ``version`` is compared), and
the loss chart only ever draws at most its own width in points.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, RichLog, Sparkline, Static
from textual_plotext import PlotextPlot

from cockpit.history import smooth
from cockpit.state import (CockpitState, elapsed, eta_next_checkpoint, eta_seconds, format_duration, memory_pressure,
                           next_checkpoint, status_word, steps_per_second)
from engine.api import format_bytes

STATUS_TONES = {"pending": ("bold reverse yellow", "yellow"), "paused": ("bold reverse yellow", "yellow"),
                "failed": ("bold reverse red", "red"), "aborted": ("bold reverse yellow", "dim"),
                "done": ("bold reverse green", "dim"), "phase": ("bold reverse", "dim")}
WARN_LEVEL = 0.85
CRITICAL_LEVEL = 0.95


class Panel(Vertical):
    """A bordered panel with a title; subclasses implement :meth:`show`."""

    def __init__(self, title: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = title
        self._version = -1

    def changed(self, state: CockpitState) -> bool:
        if state.version == self._version:
            return False
        self._version = state.version
        return True

    def show(self, state: CockpitState, now: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------- progress
def _fmt_lr(value: float) -> str:
    return f"{value:.2e}" if value else "0"


def progress_markup(state: CockpitState, now: float) -> Text:
    text = Text()
    if state.status == "idle":
        text.append("Not started", style="bold")
        text.append(" · press ctrl+r (Start) when the form is valid\n", style="dim")
        text.append(f"step 0/{state.total_steps}")
        return text
    word, detail, tone = status_word(state)
    style, detail_style = STATUS_TONES[tone]
    text.append(f" {word} ", style=style)
    if detail:
        text.append(f"  {detail}", style=detail_style)
    text.append("\n")
    text.append(f"step {state.step}/{state.total_steps}", style="bold")
    text.append(f"   epoch {state.epoch}/{state.num_epochs}")
    rate = steps_per_second(state)
    text.append(f"   {rate:.2f} it/s" if rate else "   – it/s")
    if state.loss is not None:
        text.append(f"   loss {state.loss:.4f}")
        if state.loss_ema is not None:
            text.append(f" (ema {state.loss_ema:.4f})", style="dim")
    text.append("\n")
    text.append(f"elapsed {format_duration(elapsed(state, now))}")
    if state.running:
        text.append(f"   ETA {format_duration(eta_seconds(state))}")
        target = next_checkpoint(state)
        if target is not None:
            text.append(f"   next save @{target} in {format_duration(eta_next_checkpoint(state))}")
    if state.lrs:
        text.append("\nlr " + "  ".join(f"{k} {_fmt_lr(v)}" for k, v in state.lrs))
    if state.skipped_steps:
        text.append(f"   skipped {state.skipped_steps}", style="yellow")
    if state.status == "failed" and state.error:
        text.append("\n")
        text.append(f"✖ {state.error}", style="bold red")
    elif state.final_path:
        text.append(f"\nsaved {Path(state.final_path).name}", style="green")
    if state.resume_hint:
        text.append(f"\n{state.resume_hint}", style="dim")
    return text


class ProgressPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Progress", **kwargs)
        self._last_second = -1

    def compose(self) -> ComposeResult:
        yield Static(id="progress-text")

    def show(self, state: CockpitState, now: float) -> None:
        second = int(now)
        # elapsed/ETA tick once a second while running; otherwise redraw only on change
        if not self.changed(state) and not (state.running and not state.paused and second != self._last_second):
            return
        self._last_second = second
        self.set_class(state.paused or (state.pending == "pause" and state.running), "-paused")
        self.set_class(state.status == "failed", "-failed")
        # layout=False: the text fills a fixed-size panel, so no relayout of the whole screen per update
        self.query_one("#progress-text", Static).update(progress_markup(state, now), layout=False)


# ---------------------------------------------------------------- loss
PLOT_INTERVAL = 1.0      # seconds between chart redraws while training
class LossPlot(PlotextPlot):
    """Raw loss and its EMA, downsampled to the plot's own width at render time."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state: CockpitState | None = None

    def render(self):  # type: ignore[override]
        plt = self.plt
        plt.clear_data()
        state = self.state
        width = max(8, self.size.width - 10)
        if state is not None and len(state.history):
            xs, ys, ns = state.history.series(width)
            plt.plot(xs, ys, label="loss", marker="braille")
            if len(xs) > 1:
                plt.plot(xs, smooth(ys, ns, state.smoothing), label=f"ema {state.smoothing:.2f}",
                         marker="braille")
        plt.title("")
        return super().render()


class LossPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Loss", **kwargs)
        self._plotted_at = float("-inf")
        self._plot_dirty = False

    def compose(self) -> ComposeResult:
        yield LossPlot(id="loss-plot")
        yield Sparkline([], id="loss-spark", summary_function=max)

    def show(self, state: CockpitState, now: float) -> None:
        changed = self.changed(state)
        if not changed and not self._plot_dirty:
            return
        plot = self.query_one(LossPlot)
        if changed:
            plot.state = state
            self._plot_dirty = True
        # The chart is the costliest widget (plotext + ANSI decode): while steps stream in it redraws
        # at most once per PLOT_INTERVAL (a later show catches up), so the UI leaves the CPU to training.
        mono = time.monotonic()
        if self._plot_dirty and (not (state.running and not state.paused) or mono - self._plotted_at >= PLOT_INTERVAL):
            self._plotted_at = mono
            self._plot_dirty = False
            plot.refresh()
        if not changed:
            return
        spark = self.query_one("#loss-spark", Sparkline)
        _xs, ys, _ns = state.history.series(max(8, spark.size.width or 60))
        spark.data = ys
        subtitle = f"smoothing {state.smoothing:.2f} ([ / ])"
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle


# ---------------------------------------------------------------- memory
class MemoryPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Memory", **kwargs)

    def compose(self) -> ComposeResult:
        yield Static("no samples yet", id="memory-text")
        yield Sparkline([], id="memory-spark", summary_function=max)

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        m = state.memory
        if m is None:
            return
        lines = []
        dev = (m.device or "").lower()
        if dev.startswith("mps"):
            lines.append(f"MPS current {format_bytes(m.allocated)}  driver {format_bytes(m.reserved)}")
            lines.append(f"    recommended max {format_bytes(m.device_total)}")
        elif dev.startswith("cuda"):
            lines.append(f"CUDA alloc {format_bytes(m.allocated)}  reserved {format_bytes(m.reserved)}")
            lines.append(f"     peak {format_bytes(m.peak)}  total {format_bytes(m.device_total)}")
        else:
            lines.append(f"device {m.device or 'cpu'}")
        lines.append(f"RSS {format_bytes(m.rss)}")
        lines.append(f"RAM {format_bytes(m.sys_used)} used / {format_bytes(m.sys_total)}")
        lines.append(f"    {format_bytes(m.sys_available)} available")
        level = memory_pressure(m)
        lines.append(f"pressure {level * 100:.0f}%" + ("  ⚠ near the limit" if level >= WARN_LEVEL else ""))
        self.query_one("#memory-text", Static).update("\n".join(lines), layout=False)
        self.set_class(WARN_LEVEL <= level < CRITICAL_LEVEL, "-warn")
        self.set_class(level >= CRITICAL_LEVEL, "-critical")
        self.query_one("#memory-spark", Sparkline).data = list(state.memory_history)


# ---------------------------------------------------------------- checkpoints
class CheckpointsPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Checkpoints", **kwargs)
        self._rows: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        table = DataTable(id="checkpoints-table", cursor_type="row", zebra_stripes=True)
        table.add_column("step", key="step")
        table.add_column("name", key="name")
        table.add_column("size", key="size")
        table.add_column("loss", key="loss")
        table.add_column("verified", key="verified")
        yield table

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        table = self.query_one(DataTable)
        if len(state.checkpoints) < len(self._rows):   # a new run
            table.clear()
            self._rows.clear()
        for row in state.checkpoints:
            cells = (str(row.step), row.name, format_bytes(row.bytes),
                     "–" if row.loss is None or not math.isfinite(row.loss) else f"{row.loss:.4f}",
                     Text("✔ yes", style="green") if row.verified else Text("no", style="yellow"))
            if row.path in self._rows:
                continue
            self._rows[row.path] = table.add_row(*cells, key=row.path)
            table.move_cursor(row=table.row_count - 1)
        subtitle = f"{len(state.checkpoints)} saved"
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle


# ---------------------------------------------------------------- log
class LogPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Log", **kwargs)
        self._shown = 0
        self._last: Any = None

    def compose(self) -> ComposeResult:
        yield RichLog(id="log", max_lines=500, wrap=False, markup=False, auto_scroll=True)

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        log = self.query_one(RichLog)
        lines = state.log
        # state.log is bounded; find where the new lines start
        start = 0
        if self._last is not None:
            for i in range(len(lines) - 1, -1, -1):
                if lines[i] is self._last:
                    start = i + 1
                    break
        for line in lines[start:]:
            style = {"error": "bold red", "warning": "yellow"}.get(line.level, "")
            log.write(Text(f"{line.level[:4]:<4} {line.message}", style=style))
        if lines:
            self._last = lines[-1]


# ---------------------------------------------------------------- preview
def preview_text(plan: Any) -> Text:
    text = Text()
    for sub in getattr(plan, "subsets", []):
        tag = " (reg)" if getattr(sub, "is_reg", False) else ""
        text.append(f"{sub.num_images} images × {sub.num_repeats}{tag}  ", style="bold")
        text.append(f"{sub.image_dir}\n", style="dim")
    text.append(f"{plan.batches_per_epoch} steps/epoch · {plan.num_epochs} epochs · ")
    text.append(f"{plan.total_steps} total steps\n", style="bold")
    checkpoints = list(getattr(plan, "checkpoints", []))
    if checkpoints:
        text.append(f"{len(checkpoints)} checkpoints:\n")
        shown = checkpoints if len(checkpoints) <= 6 else checkpoints[:3] + [None] + checkpoints[-2:]
        for ck in shown:
            if ck is None:
                text.append("   …\n", style="dim")
                continue
            text.append(f"{ck.step:>6} ", style="dim")
            text.append(f"{ck.filename}\n")
    free = getattr(plan, "free_bytes", None)
    text.append(f"output {plan.output_dir}\n")
    text.append(f"free space {format_bytes(free)}")
    for warning in getattr(plan, "warnings", []) or []:
        text.append(f"\n⚠ {warning}", style="yellow")
    return text


class PreviewPanel(Panel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Preview", **kwargs)

    def compose(self) -> ComposeResult:
        yield Static("fill in the form to see the plan", id="preview-text")

    def show_plan(self, plan: Any) -> None:
        self.remove_class("-error")
        self.query_one("#preview-text", Static).update(preview_text(plan))

    def show_message(self, message: str, *, error: bool = False) -> None:
        self.set_class(error, "-error")
        self.query_one("#preview-text", Static).update(Text(message, style="bold red" if error else "dim"))

    def show(self, state: CockpitState, now: float) -> None:
        return


def compose_live_panels() -> ComposeResult:
    """The live panels, as the cockpit and ``attach`` both show them (use inside a container)."""
    yield ProgressPanel(id="progress")
    yield LossPanel(id="loss")
    yield CheckpointsPanel(id="checkpoints")
    with Horizontal(id="bottom-row"):
        yield MemoryPanel(id="memory")
        yield LogPanel(id="log-panel")
