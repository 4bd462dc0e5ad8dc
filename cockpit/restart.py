"""Starting again where a run has ended: the choice the screen offers, and the config each choice starts.

A run that finished, was aborted or failed left its files in ``--output_dir``; a second Start with the
same output would be refused by the engine. :class:`RestartScreen` asks first: continue this run with
more steps, write under a new output name, overwrite, or cancel. It changes nothing until a choice is
confirmed; :func:`restart_config` turns the choice into the config to start.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.api import TrainConfig

CONTINUE, NEW_NAME, OVERWRITE = "continue", "new_name", "overwrite"
SHOWN_FILES = 4


@dataclass(frozen=True)
class RestartChoice:
    kind: str                     # continue | new_name | overwrite
    total: int | None = None      # continue: the new max_train_steps (or max_train_epochs)
    name: str | None = None       # new_name: the new output_name


@dataclass(frozen=True, kw_only=True)
class RestartOffer:
    """What the dialog says about the run that ended (ten fields: built by keyword only)."""
    name: str
    output_dir: str
    status: str                   # completed | aborted | failed
    step: int
    total_field: str              # max_train_steps | max_train_epochs
    total_default: int
    total_floor: int              # the new total must be above this (what is already trained)
    can_continue: bool
    suggested_name: str
    replaced: tuple[str, ...]     # the existing files an overwrite replaces


def _taken(out: Path, name: str) -> bool:
    """Whether ``out`` holds files of a run named ``name`` (final, step, epoch or state)."""
    patterns = (f"{name}.*", f"{name}-step*", f"{name}-[0-9][0-9][0-9][0-9][0-9][0-9].*", f"{name}-state")
    try:
        return any(next(out.glob(p), None) is not None for p in patterns)
    except OSError:
        return False


def free_name(out: Path, name: str) -> str:
    """The first ``NAME-2``, ``NAME-3``… with no files in ``out`` (``NAME-2`` itself goes on as ``NAME-3``)."""
    m = re.fullmatch(r"(.+)-(\d+)", name)
    base, n = (m.group(1), int(m.group(2)) + 1) if m else (name, 2)
    while _taken(out, f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def replaced_files(out: Path, planned: Iterable[str]) -> tuple[str, ...]:
    """Of the names a run plans to write, those that exist in ``out`` now."""
    return tuple(name for name in planned if (out / name).exists())


def restart_config(config: TrainConfig, choice: RestartChoice) -> TrainConfig:
    """The config a confirmed choice starts."""
    if choice.kind == CONTINUE:
        total = {"max_train_epochs": choice.total} if config.max_train_epochs is not None else \
            {"max_train_steps": choice.total}
        # the state holds the position: --initial_step/--initial_epoch would override its step, as in kohya
        return dataclasses.replace(config, resume="latest", resume_force=True, initial_step=None, initial_epoch=None,
                                   **total)
    fresh = dict(resume="", resume_force=False)        # a new run: nothing of the old one is resumed
    if choice.kind == NEW_NAME:
        return dataclasses.replace(config, output_name=choice.name or config.output_name, **fresh)
    if choice.kind == OVERWRITE:
        return dataclasses.replace(config, overwrite=True, **fresh)
    raise ValueError(f"unknown restart choice {choice.kind!r}")


def _files_line(files: tuple[str, ...]) -> str:
    if not files:
        return "no file of that name exists yet"
    shown = ", ".join(files[:SHOWN_FILES])
    more = len(files) - SHOWN_FILES
    return shown + (f" and {more} more" if more > 0 else "")


class RestartScreen(ModalScreen[RestartChoice | None]):
    """Continue / new output name / overwrite / cancel, each explained in one line."""

    DEFAULT_CSS = """
    RestartScreen { align: center middle; background: $background 60%; }
    #restart-dialog { width: 96; max-width: 100%; height: auto; border: thick $primary; background: $surface;
                      padding: 1 2; }
    #restart-dialog .dialog-title { text-style: bold; margin-bottom: 1; }
    .restart-row { height: auto; margin-bottom: 1; }
    .restart-row Button { width: 26; margin-right: 2; }
    .restart-row Vertical { height: auto; width: 1fr; }
    .restart-why { color: $text-muted; }
    .restart-row Input { width: 30; }
    #restart-problem { color: $error; height: auto; }
    """

    BINDINGS = [
        Binding("c", "choose('continue')", "Continue", id="restart.continue", show=False),
        Binding("n", "choose('new_name')", "New name", id="restart.new_name", show=False),
        Binding("o", "choose('overwrite')", "Overwrite", id="restart.overwrite", show=False),
        Binding("escape", "cancel", "Cancel", id="restart.cancel", show=False),
    ]

    def __init__(self, offer: RestartOffer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offer = offer

    def compose(self) -> ComposeResult:
        o = self.offer
        word = {"completed": "finished"}.get(o.status, o.status)
        unit = "epochs" if o.total_field == "max_train_epochs" else "steps"
        with Vertical(id="restart-dialog"):
            yield Label(f"{o.name} {word} at step {o.step}. Start again how?", classes="dialog-title",
                        markup=False)
            with Horizontal(classes="restart-row"):
                yield Button(escape("Continue this run [c]"), id="restart-continue", variant="primary",
                             disabled=not o.can_continue)
                with Vertical():
                    why = (f"resume its last saved state and train on to this many {unit} "
                           f"(--resume latest --resume_force, {o.total_field}):" if o.can_continue else
                           "not possible: the run saved no training state (set save_state to continue later)")
                    yield Static(why, classes="restart-why", markup=False)
                    if o.can_continue:
                        yield Input(str(o.total_default), id="restart-total", type="integer", compact=True)
            with Horizontal(classes="restart-row"):
                yield Button(escape("New output name [n]"), id="restart-new_name", variant="success")
                with Vertical():
                    yield Static(f"a new run beside this one; {o.name}'s files stay as they are. Its name:",
                                 classes="restart-why", markup=False)
                    yield Input(o.suggested_name, id="restart-name", compact=True)
            with Horizontal(classes="restart-row"):
                yield Button(escape("Overwrite [o]"), id="restart-overwrite", variant="error")
                yield Static(f"a new run under the same name (--overwrite); it replaces "
                             f"{_files_line(o.replaced)}", classes="restart-why", markup=False)
            with Horizontal(classes="restart-row"):
                yield Button(escape("Cancel [esc]"), id="restart-cancel")
                yield Static("start nothing; this run stays on screen", classes="restart-why", markup=False)
            yield Static("", id="restart-problem", markup=False)

    def on_mount(self) -> None:
        first = "#restart-continue" if self.offer.can_continue else "#restart-new_name"
        self.query_one(first, Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        kind = (event.button.id or "").removeprefix("restart-")
        if kind == "cancel":
            self.dismiss(None)
        else:
            self.action_choose(kind)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_choose(CONTINUE if event.input.id == "restart-total" else NEW_NAME)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_choose(self, kind: str) -> None:
        choice, problem = self._choice(kind)
        self.query_one("#restart-problem", Static).update(problem)
        if choice is not None:
            self.dismiss(choice)

    def _choice(self, kind: str) -> tuple[RestartChoice | None, str]:
        o = self.offer
        if kind == CONTINUE:
            if not o.can_continue:
                return None, "this run cannot be continued: it saved no training state"
            text = self.query_one("#restart-total", Input).value.strip()
            if not text.isdigit() or int(text) <= o.total_floor:
                return None, f"{o.total_field}: give a whole number above {o.total_floor} (what is trained already)"
            return RestartChoice(CONTINUE, total=int(text)), ""
        if kind == NEW_NAME:
            name = self.query_one("#restart-name", Input).value.strip()
            if not name or name == o.name or "/" in name:
                return None, f"output_name: give a new name (not {o.name}, no '/')"
            if _taken(Path(o.output_dir), name):
                return None, f"output_name: {o.output_dir} already holds files named {name}; pick another"
            return RestartChoice(NEW_NAME, name=name), ""
        if kind == OVERWRITE:
            return RestartChoice(OVERWRITE), ""
        return None, ""
