"""The samples panel: the latest sample set, one thumbnail and its prompt per image.

Hidden until the run's first sample set arrives; then it shows itself once when the terminal has room
for it beside every other panel (``AUTO_SHOW_ROWS``), and ``i`` shows and hides it at any size. It sits
below the memory/log row: memory stays in view, as do step, loss and ETA. :class:`SamplesKeys`
is the monitor's side of it: the keys that make samples, open the compare screen and toggle the panel.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from cockpit.compare import CompareScreen, grid_of
from cockpit.images import image_widget
from cockpit.panels import Panel
from cockpit.samples import SampleSet
from cockpit.state import CockpitState

MAX_THUMBNAILS = 6
AUTO_SHOW_ROWS = 48       # a shorter terminal keeps the chart's rows; ``i`` still shows the panel


class SamplesPanel(Panel):
    """The latest sample set (thumbnails + prompt text)."""

    PANEL_TITLE = "Samples"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shown_set: tuple | None = None
        self._book_version = -1

    def compose(self) -> ComposeResult:
        yield Horizontal(id="samples-row")
        yield Static("no samples yet · g: sample now · c: compare checkpoints", id="samples-note", markup=False)

    def show(self, state: CockpitState, now: float) -> None:
        book = state.sample_book
        if book.version == self._book_version:
            return
        self._book_version = book.version
        latest = book.latest
        key = None if latest is None else (latest.step, tuple((i.path, i.error) for i in latest.images))
        if key == self._shown_set:
            return
        self._shown_set = key
        self._fill(latest)

    def _fill(self, latest: SampleSet | None) -> None:
        row = self.query_one("#samples-row", Horizontal)
        row.remove_children()
        note = self.query_one("#samples-note", Static)
        if latest is None:
            note.update("no samples yet · g: sample now · c: compare checkpoints")
            return
        cells = []
        for image in latest.images[:MAX_THUMBNAILS]:
            cell = Vertical(classes="sample-cell")
            cell.compose_add_child(image_widget(image.path or None, note=image.error or "failed",
                                                classes="sample-image"))
            cell.compose_add_child(Static(image.prompt or f"prompt {image.index}", classes="sample-prompt",
                                          markup=False))
            cells.append(cell)
        row.mount_all(cells)
        more = len(latest.images) - MAX_THUMBNAILS
        where = f"step {latest.step}" + (f" · {latest.checkpoint.rsplit('/', 1)[-1]}" if latest.checkpoint else "")
        extra = f" · +{more} more in c" if more > 0 else ""
        failed = sum(1 for i in latest.images if not i.path)
        fails = f" · {failed} failed" if failed else ""
        note.update(f"{where} · {latest.seconds:.1f}s{fails}{extra} · g: sample now · c: compare checkpoints")


class SamplesKeys:
    """The monitor's samples panel and compare screen: ``g`` (sample now), ``c`` (compare), ``i`` (panel).

    A mixin of :class:`cockpit.monitor.MonitorApp` (which owns ``state``, ``source``, ``samples_panel`` and
    ``_command``); ``_show_samples`` runs on every redraw."""

    _samples_seen = False             # the samples panel shows itself once, on the first sample set
    _grid_key: Any = None

    def _show_samples(self, state: CockpitState) -> None:
        if state.sample_book.sets and not self._samples_seen:
            self._samples_seen = True
            if self.size.height >= AUTO_SHOW_ROWS:
                self.set_samples_visible(True)
        screen = self.screen_stack[-1] if self.screen_stack else None   # none while the app tears down
        if isinstance(screen, CompareScreen):
            key = (state.sample_book.version, state.checkpoints)
            if key != self._grid_key:
                self._grid_key = key
                screen.update_grid(*grid_of(state))

    @property
    def samples_visible(self) -> bool:
        return self.samples_panel.parent is not None and self.samples_panel.parent.has_class("-samples")

    def set_samples_visible(self, visible: bool) -> None:
        parent = self.samples_panel.parent
        if parent is not None:
            parent.set_class(visible, "-samples")

    def action_toggle_samples(self) -> None:
        self.set_samples_visible(not self.samples_visible)

    def action_compare(self) -> None:
        if isinstance(self.screen, CompareScreen):
            return
        self._grid_key = (self.state.sample_book.version, self.state.checkpoints)
        title = self.state.output_name or self.state.run_id
        self.push_screen(CompareScreen(*grid_of(self.state), title=title))

    def action_sample_now(self) -> None:
        if not self.state.running:
            return
        if self._command(self.source.sample):
            self.notify("samples at the next step boundary", timeout=3)
