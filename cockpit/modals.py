"""Modal screens: abort confirmation, key help, save-as-TOML."""

from __future__ import annotations

from typing import Any, Iterable

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

SAVE_AND_STOP = "save"
STOP_NO_SAVE = "nosave"


class ConfirmAbortScreen(ModalScreen[str | None]):
    """Save and stop / stop without saving / cancel. Dismisses with SAVE_AND_STOP, STOP_NO_SAVE or None."""

    BINDINGS = [
        Binding("s", "choose('save')", "Save and stop", id="confirm.save"),
        Binding("n", "choose('nosave')", "Stop without saving", id="confirm.nosave"),
        Binding("escape,c", "choose('')", "Cancel", id="confirm.cancel"),
    ]

    def __init__(self, title: str = "Stop training?", detail: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._title = title
        self._detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="dialog"):
            yield Label(self._title, classes="dialog-title")
            if self._detail:
                yield Static(self._detail, classes="dialog-detail", markup=False)
            with Horizontal(classes="dialog-buttons"):
                # a label is markup: the key hints' brackets are escaped, or they vanish
                yield Button(escape("Save and stop [s]"), id="confirm-save", variant="warning")
                yield Button(escape("Stop without saving [n]"), id="confirm-nosave", variant="error")
                yield Button(escape("Cancel [esc]"), id="confirm-cancel", variant="default")

    def on_mount(self) -> None:
        self.query_one("#confirm-save", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        choice = {"confirm-save": SAVE_AND_STOP, "confirm-nosave": STOP_NO_SAVE}.get(event.button.id or "")
        self.dismiss(choice)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice or None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]

    def __init__(self, rows: Iterable[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rows = list(rows)

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"  {keys:<18} {what}" for keys, what in self._rows)
        with Vertical(id="help-dialog", classes="dialog"):
            yield Label("spyke-cockpit keys", classes="dialog-title")
            yield Static(lines, markup=False)
            yield Static("Keys are remappable by binding id (App.set_keymap). Esc closes.", classes="dialog-detail")

    def action_close(self) -> None:
        self.dismiss(None)


class SaveTomlScreen(ModalScreen[str | None]):
    """Ask for a file name; dismisses with the path text or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="savetoml.cancel")]

    def __init__(self, default: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="save-dialog", classes="dialog"):
            yield Label("Save the config as TOML", classes="dialog-title")
            yield Input(self._default, id="save-path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", id="save-ok", variant="primary")
                yield Button("Cancel", id="save-cancel")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save-ok":
            self.dismiss(self.query_one("#save-path", Input).value.strip() or None)
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
