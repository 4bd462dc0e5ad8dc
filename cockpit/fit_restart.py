"""Restarting a run that ran out of memory with one of the settings that would fit.

The engine's out-of-memory stop names those settings (``RunFinished.fits``: the memory estimator's, each
with its estimated saving, then the ones it cannot size, e.g. ``--cache_latents (−1.2 GB est.)``,
``--gradient_checkpointing``, ``--resolution=384``). :class:`FitRestartScreen` lists the ones that are a
concrete flag; choosing one puts it into the form (the one config that drives it) and starts again:
from the run's last saved training state when there is one (``--resume latest``, with
``--resume_force`` since a setting changed, as kohya's ``--resume`` loads a state whatever the flags),
else as a new run through the usual Start (which asks before touching the run's files).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from engine.api import ConfigError, TrainConfig, coerce_value, field_type

_FLAG = re.compile(r"--([a-z0-9_]+)(?:=(\S+))?")
MAX_SHOWN = 9                     # keys 1..9


@dataclass(frozen=True)
class FitChange:
    text: str                     # as the engine named it, saving included
    field: str
    value: Any

    @property
    def flag(self) -> str:
        return self.text.split(" ", 1)[0]


def fit_changes(fits: tuple[str, ...] | list[str], config: TrainConfig | None) -> list[FitChange]:
    """The engine's suggestions that are one concrete flag of the config and would change it."""
    out: list[FitChange] = []
    for text in fits:
        m = _FLAG.fullmatch(text.split(" ", 1)[0])
        if m is None or m.group(1) not in _fields():
            continue
        name, raw = m.group(1), m.group(2)
        try:
            value = True if raw is None and field_type(name) is bool else coerce_value(name, raw, "--" + name)
        except (ConfigError, AssertionError, KeyError):
            continue
        if raw is None and field_type(name) is not bool:
            continue
        if config is not None and getattr(config, name, None) == value:
            continue
        out.append(FitChange(text, name, value))
    return out[:MAX_SHOWN]


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def fitted_config(config: TrainConfig, change: FitChange, resume: bool) -> TrainConfig:
    """``config`` with ``change`` applied; resuming the last saved state, or as a new run."""
    changed = dataclasses.replace(config, **{change.field: change.value})
    if resume:
        # the state holds the position: --initial_step/--initial_epoch would override its step, as in kohya
        return dataclasses.replace(changed, resume="latest", resume_force=True, initial_step=None, initial_epoch=None)
    return dataclasses.replace(changed, resume="", resume_force=False)


class FitRestartScreen(ModalScreen[FitChange | None]):
    """The settings that would fit, one button each (keys 1–9); escape cancels."""

    DEFAULT_CSS = """
    FitRestartScreen { align: center middle; background: $background 60%; }
    #fit-dialog { width: 90; max-width: 100%; height: auto; border: thick $warning; background: $surface;
                  padding: 1 2; }
    #fit-dialog .dialog-title { text-style: bold; margin-bottom: 1; }
    #fit-dialog Button { width: 100%; content-align: left middle; }
    #fit-cancel { margin-top: 1; }
    .fit-why { color: $text-muted; margin-bottom: 1; }
    """

    BINDINGS = [Binding(str(i), f"pick({i - 1})", show=False) for i in range(1, MAX_SHOWN + 1)] + [
        Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, changes: list[FitChange], step: int, resume: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.changes, self.step, self.resume = changes, step, resume

    def compose(self) -> ComposeResult:
        how = (f"then resume the last saved state (step {self.step}; --resume latest --resume_force)"
               if self.resume else "then start it as a new run (no training state was saved)")
        with Vertical(id="fit-dialog"):
            yield Label("The run ran out of memory. Restart it with one change:", classes="dialog-title",
                        markup=False)
            yield Static(f"the change goes into the form, {how}", classes="fit-why", markup=False)
            for i, change in enumerate(self.changes):
                yield Button(escape(f"[{i + 1}] {change.text}"), id=f"fit-{i}", classes="fit-choice", compact=True)
            yield Button(escape("Cancel [esc]"), id="fit-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#fit-0" if self.changes else "#fit-cancel", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        ident = event.button.id or ""
        self.action_cancel() if ident == "fit-cancel" else self.action_pick(int(ident.removeprefix("fit-")))

    def action_pick(self, index: int) -> None:
        if 0 <= index < len(self.changes):
            self.dismiss(self.changes[index])

    def action_cancel(self) -> None:
        self.dismiss(None)


def offer_fit_restart(app) -> bool:
    """Open the dialog for the run on screen (a CockpitApp); False when there is nothing to offer."""
    s = app.state
    config = app.form.config
    changes = fit_changes(s.fits, config) if s.status == "failed" and config is not None else []
    if not changes or isinstance(app.screen, FitRestartScreen):
        return False
    resume = bool(s.last_state_dir or s.resume_hint)

    def chosen(change: FitChange | None) -> None:
        if change is None or app.form.config is None:
            return
        app.form.set_config(fitted_config(app.form.config, change, resume))    # the form says what runs
        if app.form.config is None:
            app.notify("fix the highlighted fields first", severity="warning")
        elif resume:
            app._start_with(app.form.config)
        else:
            app.action_start()              # a new run: Start asks before it touches the run's files

    app.push_screen(FitRestartScreen(changes, s.step, resume), callback=chosen)
    return True


def can_fit_restart(state, config: TrainConfig | None) -> bool:
    return state.status == "failed" and bool(fit_changes(state.fits, config))
