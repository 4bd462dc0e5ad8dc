"""The compare screen: checkpoints × prompts, each cell that checkpoint's image for that prompt.

Rows are the run's checkpoints (step, file name, validation loss; ★ marks the lowest), columns the
prompts of the prompts file. The arrow keys move the selection, enter opens the selected image large
(real pixels where the terminal draws them), escape goes back. The cockpit and ``attach`` open it with
``c``; ``spyke-cockpit compare RUN`` opens it on its own for a finished run (:class:`CompareApp`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Static

from cockpit.images import HalfBlockImage, graphics_mode, image_widget
from cockpit.samples import CompareRow, SampleImage, compare_rows, format_loss
from cockpit.state import CockpitState

STAR = "★"


def grid_of(state: CockpitState) -> tuple[tuple[CompareRow, ...], tuple[str, ...]]:
    """The compare grid's rows and prompt texts for a cockpit state."""
    return compare_rows(state.sample_book, state.checkpoints, base=state.output_dir), state.sample_book.prompts


def row_label(row: CompareRow) -> str:
    star = f"{STAR} best" if row.best else ""
    name = row.name or "(samples only)"
    return f"step {row.step} {star}".rstrip() + f"\n{name}\nval {format_loss(row.validation)}"


class _Grid(VerticalScroll, can_focus=False):
    """The scrolling grid (the screen's keys move the selection, not the scroll)."""


class CompareScreen(Screen[None]):
    """Checkpoints (rows) × prompts (columns)."""

    BINDINGS = [
        Binding("up", "move(-1, 0)", "Up", show=False, priority=True),
        Binding("down", "move(1, 0)", "Down", show=False, priority=True),
        Binding("left", "move(0, -1)", "Left", show=False, priority=True),
        Binding("right", "move(0, 1)", "Right", show=False, priority=True),
        Binding("enter", "open", "Open large", id="compare.open", priority=True),
        Binding("escape", "back", "Back", id="compare.back"),
    ]

    def __init__(self, rows: tuple[CompareRow, ...], prompts: tuple[str, ...], *, title: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.rows, self.prompts = rows, prompts
        self.run_title = title
        best = next((i for i, r in enumerate(rows) if r.best), 0)
        self.selected = (best, 0)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        best = next((r for r in self.rows if r.best), None)
        summary = (f"{STAR} lowest validation loss: step {best.step} ({format_loss(best.validation)})" if best
                   else "no validation loss in this run (train with --validation_split to get one)")
        yield Static(f"{self.run_title + ' · ' if self.run_title else ''}{summary} · arrows move · enter opens · "
                     "esc back", id="compare-summary", markup=False)
        yield Static("", id="compare-selection", markup=False)
        with _Grid(id="compare-grid"):
            if not self.rows:
                yield Static("no checkpoints or samples in this run yet", id="compare-empty", markup=False)
                return
            with Horizontal(classes="cmp-header"):
                yield Static("checkpoint", classes="cmp-label")
                for i, prompt in enumerate(self.prompts):
                    yield Static(f"{i}: {prompt}", classes="cmp-prompt", markup=False)
            for r, row in enumerate(self.rows):
                with Horizontal(classes="cmp-row" + (" -best" if row.best else "")):
                    yield Static(row_label(row), classes="cmp-label", markup=False)
                    for c, image in enumerate(row.images):
                        yield HalfBlockImage(image.path if image else None, note=_note(image),
                                             id=f"cell-{r}-{c}", classes="cmp-cell")
        yield Footer()

    def on_mount(self) -> None:
        self._select(*self.selected)

    # ------------------------------------------------------------------ live updates
    def update_grid(self, rows: tuple[CompareRow, ...], prompts: tuple[str, ...]) -> None:
        """New sample sets or checkpoints arrived while the screen is open: redraw, keeping the selection."""
        if (rows, prompts) == (self.rows, self.prompts):
            return
        self.rows, self.prompts = rows, prompts
        r, c = self.selected
        self.selected = (min(r, max(0, len(rows) - 1)), min(c, max(0, len(prompts) - 1)))
        self.refresh(recompose=True)
        self.call_after_refresh(lambda: self._select(*self.selected))

    # ------------------------------------------------------------------ selection
    def cell(self, r: int, c: int) -> HalfBlockImage | None:
        found = self.query(f"#cell-{r}-{c}")
        return found.first() if found else None

    def _select(self, r: int, c: int) -> None:
        old = self.cell(*self.selected)
        if old is not None:
            old.remove_class("-selected")
        self.selected = (r, c)
        new = self.cell(r, c)
        if new is not None:
            new.add_class("-selected")
            self.query_one(_Grid).scroll_to_widget(new, animate=False)
        self.query_one("#compare-selection", Static).update(self.selection_text())

    def selection_text(self) -> str:
        """What the selected cell is, in words (the line under the summary)."""
        if not self.rows:
            return ""
        row, image = self.rows[self.selected[0]], self.selected_image
        where = f"selected: step {row.step}{' ' + STAR if row.best else ''} · {row.name or 'samples only'}"
        if image is None:
            return where + " · no image"
        seed = f" · seed {image.seed}" if image.seed is not None else ""
        return where + f" · prompt {image.index}: {image.prompt}{seed}"


    def action_move(self, dr: int, dc: int) -> None:
        if not self.rows or not self.prompts:
            return
        r, c = self.selected
        self._select(min(max(0, r + dr), len(self.rows) - 1), min(max(0, c + dc), len(self.prompts) - 1))

    @property
    def selected_image(self) -> SampleImage | None:
        r, c = self.selected
        if not self.rows or r >= len(self.rows) or c >= len(self.rows[r].images):
            return None
        return self.rows[r].images[c]

    def action_open(self) -> None:
        image = self.selected_image
        if image is None or not image.path:
            self.notify(_note(image), severity="warning", timeout=3)
            return
        row = self.rows[self.selected[0]]
        seed = f" · seed {image.seed}" if image.seed is not None else ""
        caption = (f"step {row.step}{' ' + STAR if row.best else ''} · {row.name or 'samples'} · "
                   f"val {format_loss(row.validation)} · prompt {image.index}: {image.prompt}{seed}")
        self.app.push_screen(ImageScreen(image.path, caption))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit(0)


def _note(image: SampleImage | None) -> str:
    if image is None:
        return "no image"
    return f"failed: {image.error}" if image.error else "no image"


class ImageScreen(ModalScreen[None]):
    """One image, large."""

    BINDINGS = [Binding("escape,enter,q", "close", "Close", id="image.close")]

    def __init__(self, path: str, caption: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path, self.caption = path, caption

    def compose(self) -> ComposeResult:
        with Vertical(id="image-dialog"):
            yield image_widget(self.path, id="image-large")
            yield Static(self.caption, id="image-caption", markup=False)
            yield Static(f"{Path(self.path).name} · esc closes", classes="dialog-detail", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


class CompareApp(App[int]):
    """``spyke-cockpit compare RUN``: the compare screen for a run folder, on its own."""

    CSS_PATH = Path(__file__).resolve().parent / "cockpit.tcss"
    TITLE = "spyke-cockpit compare"
    BINDINGS = [Binding("q", "quit_compare", "Quit", id="quit")]

    def __init__(self, state: CockpitState, *, title: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        graphics_mode()                   # before Textual owns the terminal
        self.state = state
        self.run_title = title

    def get_default_screen(self) -> Screen:
        rows, prompts = grid_of(self.state)
        return CompareScreen(rows, prompts, title=self.run_title)

    def action_quit_compare(self) -> None:
        self.exit(0)
