"""The samples panel: the latest sample set, one thumbnail and its prompt per image.

Hidden until the run's first sample set arrives (then shown once; ``i`` shows and hides it). While it
is shown it takes the memory/log row's place, so the loss chart keeps its height.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from cockpit.images import image_widget
from cockpit.panels import Panel
from cockpit.samples import SampleSet
from cockpit.state import CockpitState

MAX_THUMBNAILS = 6


class SamplesPanel(Panel):
    """The latest sample set (thumbnails + prompt text)."""

    def __init__(self, **kwargs) -> None:
        super().__init__("Samples", **kwargs)
        self._shown_set: tuple | None = None
        self._book_version = -1

    def compose(self) -> ComposeResult:
        yield Horizontal(id="samples-row")
        yield Static("no samples yet · g: sample now · c: compare checkpoints", id="samples-note", markup=False)

    def show(self, state: CockpitState, now: float) -> None:
        book = state.samples
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
