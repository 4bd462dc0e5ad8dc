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
from textual.containers import Container
from textual.css.query import NoMatches
from textual.widgets import DataTable, RichLog, Sparkline, Static
from textual_plotext import PlotextPlot

from cockpit.chart import draw_loss, draw_lr, legend_markup
from cockpit.memory_panel import MemoryPanel, memory_bars, memory_lines  # noqa: F401 - the live panels' set
from cockpit.panel_base import Panel
from cockpit.state import (CockpitState, best_validation, elapsed, eta_next_checkpoint, eta_seconds, format_duration,
                           next_checkpoint, resume_command, status_word, steps_per_second)
from engine.api import format_bytes

STATUS_TONES = {"pending": ("bold reverse yellow", "yellow"), "paused": ("bold reverse yellow", "yellow"),
                "failed": ("bold reverse red", "red"), "aborted": ("bold reverse yellow", "dim"),
                "done": ("bold reverse green", "dim"), "phase": ("bold reverse", "dim")}
# ---------------------------------------------------------------- progress
def _fmt_lr(value: float) -> str:
    return f"{value:.2e}" if value else "0"


def progress_markup(state: CockpitState, now: float) -> Text:
    """The run at a glance, the most needed first (a short terminal cuts the last lines)."""
    text = Text()
    if state.status == "idle":
        text.append("Not started", style="bold")
        text.append(" · press ctrl+r (Start) when the form is valid\n", style="dim")
        text.append(f"step 0/{state.total_steps}")
        return text
    word, detail_words, tone = status_word(state)
    style, detail_style = STATUS_TONES[tone]
    text.append(f" {word} ", style=style)
    text.append("  ")
    detail = Text(f"  {detail_words}" if detail_words else "", style=detail_style)
    text.append(f"step {state.step}/{state.total_steps}", style="bold")
    text.append(f"   epoch {state.epoch}/{state.num_epochs}")
    rate = steps_per_second(state)
    text.append(f"   {rate:.2f} it/s" if rate else "   – it/s")
    text.append_text(detail)
    text.append("\n")
    if state.loss is not None:
        text.append(f"loss {state.loss:.4f}")
        if state.loss_ema is not None:
            text.append(f" (ema {state.loss_ema:.4f})", style="dim")
        text.append("   ")
    text.append(f"elapsed {format_duration(elapsed(state, now))}")
    if state.running:
        text.append(f"   ETA {format_duration(eta_seconds(state))}")
    text.append("\n")
    parts = []
    target = next_checkpoint(state) if state.running else None
    if target is not None:
        parts.append(f"next save @{target} in {format_duration(eta_next_checkpoint(state))}")
    if state.checkpoints:
        last = state.checkpoints[-1]
        parts.append(f"last save @{last.step} {'✔' if last.verified else '✖ not verified'}")
    text.append("   ".join(parts) or "no checkpoint yet", style="" if parts else "dim")
    if state.lrs:
        text.append("\nlr " + "  ".join(f"{k} {_fmt_lr(v)}" for k, v in state.lrs))
    if state.skipped_steps:
        text.append(f"   skipped {state.skipped_steps}", style="yellow")
    if state.status == "failed" and state.error:
        text.append("\n")
        text.append(f"✖ {state.error}", style="bold red")
    elif state.final_path:
        text.append(f"\nsaved {Path(state.final_path).name}", style="green")
    command = resume_command(state)
    if command:
        text.append("\nto resume (y copies it): ", style="dim")
        text.append(command)
    return text


class ProgressPanel(Panel):
    PANEL_TITLE = "Progress"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
        self.set_class(bool(resume_command(state) or state.resume_hint or state.error), "-long")
        # layout=False: the text fills a fixed-size panel, so no relayout of the whole screen per update
        self.query_one("#progress-text", Static).update(progress_markup(state, now), layout=False)


# ---------------------------------------------------------------- loss
class LossPlot(PlotextPlot):
    """Loss, its EMA and the validation loss (or the learning rates), at most the plot's width in points."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state: CockpitState | None = None
        self.mode = "loss"                 # loss | lr
        self.render_seconds = 0.0          # what the latest draw cost (the chart's pace stretches to keep it small)

    def render(self):  # type: ignore[override]
        started = time.perf_counter()
        try:
            return self._render_chart()
        finally:
            self.render_seconds = time.perf_counter() - started

    def _render_chart(self):
        plt = self.plt
        plt.clear_data()
        state = self.state
        width = max(8, self.size.width - 10)
        if state is not None:
            (draw_lr if self.mode == "lr" else draw_loss)(plt, state, width)
        plt.title("")
        return super().render()


class LossPanel(Panel):
    """The chart redraws with the progress line (so it shows the same latest step); its legend sits in
    the title, outside the plot. ``l`` switches it to the learning rates."""

    PANEL_TITLE = "Loss"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plotted_at = float("-inf")     # time.monotonic() of the last chart redraw
        self._plotted_version = -1
        self._lag = ""
        self.mode = "loss"

    def compose(self) -> ComposeResult:
        yield LossPlot(id="loss-plot")
        yield Sparkline([], id="loss-spark", summary_function=max)

    @property
    def render_seconds(self) -> float:
        """What drawing the chart cost the last time (0 before it was drawn)."""
        try:
            return self.query_one(LossPlot).render_seconds
        except NoMatches:
            return 0.0

    def toggle_mode(self, state: CockpitState) -> str:
        self.mode = "lr" if self.mode == "loss" else "loss"
        self._version = -1
        self.show(state, 0.0)
        return self.mode

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        plot = self.query_one(LossPlot)
        plot.state = state
        plot.mode = self.mode
        plot.refresh()
        self._plotted_at = time.monotonic()
        self._plotted_version = state.version
        self._lag = ""
        spark = self.query_one("#loss-spark", Sparkline)
        _xs, ys, _ns = state.history.series(max(8, spark.size.width or 60))
        spark.data = ys
        self._set_title(state)
        subtitle = f"smoothing {state.smoothing:.2f} ([ / ]) · l: {'loss' if self.mode == 'lr' else 'lr'}"
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle

    def show_lag(self, state: CockpitState, interval: float) -> None:
        """The chart was not redrawn this time: say how old it is once it lags more than ``interval``."""
        age = time.monotonic() - self._plotted_at
        lag = f"chart updated {age:.0f}s ago" if state.version != self._plotted_version and age > interval else ""
        if lag != self._lag:
            self._lag = lag
            self._set_title(state)

    def _set_title(self, state: CockpitState) -> None:
        name = "Learning rate" if self.mode == "lr" else "Loss"
        title = f"{name}  {legend_markup(state, self.mode)}"
        if self._lag:
            title += f"  [dim]· {self._lag}[/]"
        if self.border_title != title:
            self.border_title = title


# ---------------------------------------------------------------- checkpoints
BASE_COLUMNS = (("step", "step"), ("name", "name"), ("size", "size"), ("loss", "loss"), ("verified", "verified"))
BEST = "★"


def checkpoint_columns(state: CockpitState) -> tuple[tuple[str, str], ...]:
    """The table's columns: ``val loss`` and ``samples`` only once some checkpoint has them."""
    columns = BASE_COLUMNS
    if any(r.val_loss is not None for r in state.checkpoints) or state.sample_book.validations:
        columns += (("val_loss", "val loss"),)
    if any(r.samples for r in state.checkpoints) or state.sample_book.sets:
        columns += (("samples", "samples"),)
    return columns


def _loss_cell(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4f}"


def checkpoint_cells(state: CockpitState, columns: tuple[tuple[str, str], ...]) -> list[tuple[str, tuple]]:
    best = best_validation(state)
    out = []
    for row in state.checkpoints:
        verified = Text("✔", style="green") if row.verified else Text("✖ no", style="yellow")
        cell = {"step": str(row.step), "name": Text(row.name, style="dim strike") if row.removed else row.name,
                "size": format_bytes(row.bytes), "loss": _loss_cell(row.loss),
                "verified": Text("removed", style="dim") if row.removed else verified,
                "samples": str(row.samples) if row.samples else "–"}
        if row.val_loss is None:
            cell["val_loss"] = "–"
        elif best is not None and row.path == best.path:
            cell["val_loss"] = Text(f"{BEST} {_loss_cell(row.val_loss)}", style="bold green")
        else:
            cell["val_loss"] = f"  {_loss_cell(row.val_loss)}"
        out.append((row.path, tuple(cell[key] for key, _ in columns)))
    return out


class CheckpointsPanel(Panel):
    """The saved checkpoints, the newest kept in view."""

    PANEL_TITLE = "Checkpoints"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rows: dict[str, tuple] = {}
        self._columns: tuple[tuple[str, str], ...] = ()

    def compose(self) -> ComposeResult:
        yield DataTable(id="checkpoints-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self._set_columns(BASE_COLUMNS)

    def _set_columns(self, columns: tuple[tuple[str, str], ...]) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for key, label in columns:
            table.add_column(label, key=key)
        self._columns = columns
        self._rows.clear()

    def show(self, state: CockpitState, now: float) -> None:
        if not self.changed(state):
            return
        table = self.query_one(DataTable)
        columns = checkpoint_columns(state)
        if columns != self._columns:
            self._set_columns(columns)
        cells = checkpoint_cells(state, columns)
        if len(cells) < len(self._rows) or any(path not in dict(cells) for path in self._rows):   # a new run
            table.clear()
            self._rows.clear()
        added = False
        for path, row in cells:
            old = self._rows.get(path)
            if old is None:
                table.add_row(*row, key=path)
                added = True
            elif old != row:
                for (key, _), value, before in zip(columns, row, old):
                    if value != before:
                        table.update_cell(path, key, value)
            self._rows[path] = row
        if added:
            newest = table.row_count - 1
            table.move_cursor(row=newest)
            self.call_after_refresh(lambda: table.move_cursor(row=newest, animate=False))
        subtitle = f"{len(state.checkpoints)} saved"
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle


# ---------------------------------------------------------------- log
class LogPanel(Panel):
    PANEL_TITLE = "Log"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown = 0
        self._last: Any = None

    def compose(self) -> ComposeResult:
        yield RichLog(id="log", max_lines=500, wrap=True, min_width=16, markup=False, auto_scroll=True)

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
            mark = {"error": "✖ ", "warning": "⚠ "}.get(line.level, "")
            log.write(Text(f"{mark}{line.message}", style=style))
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
    start = getattr(plan, "start", None)
    if start is not None:   # --initial_step/--initial_epoch
        first = f"after step {start.step}" if start.skip else "at step 0"
        text.append(f"starts {first} in epoch {start.epoch + 1}, ends at step {plan.last_step}\n")
    checkpoints = list(getattr(plan, "checkpoints", []))
    if checkpoints:
        kept = sum(1 for ck in checkpoints if getattr(ck, "kept", True))
        text.append(f"{len(checkpoints)} checkpoints" + (f" ({kept} kept)" if kept < len(checkpoints) else "") + ":\n")
        shown = checkpoints if len(checkpoints) <= 6 else checkpoints[:3] + [None] + checkpoints[-2:]
        validated = getattr(getattr(plan, "dataset", None), "validation", None) is not None
        removed = "  (removed later unless it has the best validation loss)\n" if validated else "  (removed later)\n"
        for ck in shown:
            if ck is None:
                text.append("   …\n", style="dim")
                continue
            text.append(f"{ck.step:>6} ", style="dim")
            text.append(f"{ck.filename}")
            text.append("\n" if getattr(ck, "kept", True) else removed, style="dim")
    free = getattr(plan, "free_bytes", None)
    text.append(f"output {plan.output_dir}\n")
    text.append(f"free space {format_bytes(free)}")
    memory = getattr(plan, "memory", None)
    if memory is not None:
        style = {"fits": "green", "tight": "yellow", "too_big": "bold red"}.get(getattr(memory, "verdict", ""), "dim")
        text.append(f"\n{memory.summary()}", style=style)
    for warning in getattr(plan, "warnings", []) or []:
        text.append(f"\n⚠ {warning}", style="yellow")
    return text


class PreviewPanel(Panel):
    PANEL_TITLE = "Preview"

    def compose(self) -> ComposeResult:
        yield Static("fill in the form to see the plan", id="preview-text")

    def show_plan(self, plan: Any) -> None:
        self.remove_class("-error")
        self._show(preview_text(plan))

    def show_message(self, message: str, *, error: bool = False) -> None:
        self.set_class(error, "-error")
        self._show(Text(message, style="bold red" if error else "dim"))

    def _show(self, text: Text) -> None:
        """A plan worked out in the background can arrive as the app closes, its text already gone: then it
        has nowhere to go."""
        for static in self.query("#preview-text").results(Static):
            static.update(text)

    def show(self, state: CockpitState, now: float) -> None:
        return


def compose_live_panels() -> ComposeResult:
    """The live panels, as the cockpit and ``attach`` both show them (use inside a container)."""
    yield ProgressPanel(id="progress")
    yield LossPanel(id="loss")
    with Container(id="lower"):              # stacked on a tall screen, side by side on a short one
        yield CheckpointsPanel(id="checkpoints")
        with Container(id="bottom-row"):
            yield MemoryPanel(id="memory")
            yield LogPanel(id="log-panel")
