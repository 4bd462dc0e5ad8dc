"""Restarting a run that ran out of memory with one of the changes that would fit.

The engine's out-of-memory stop names those changes (``RunFinished.fits``: the memory estimator's, each
with the estimated peak after it, e.g. ``--gradient_checkpointing (est. peak 6.1 GB, −1.4 GB)``, or
several flags together when only a combination fits; without the model's sizes, unsized flags).
:class:`FitRestartScreen` lists the ones made of concrete flags of the config; choosing one puts exactly
its flags into the form (the one config that drives it) and starts again:
from the run's last saved training state when there is one (``--resume latest``, with
``--resume_force`` since a setting changed, as kohya's ``--resume`` loads a state whatever the flags),
else as a new run through the usual Start (which asks before touching the run's files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from engine.api import ConfigError, TrainConfig, change_flags, coerce_value, field_type

MAX_SHOWN = 9                     # keys 1..9


@dataclass(frozen=True)
class FitChange:
    text: str                     # as the engine named it, estimated peak included
    values: tuple[tuple[str, Any], ...]   # (config field, value) of each of its flags

    @property
    def flag(self) -> str:
        """Its flags, as typed (``--gradient_checkpointing --train_batch_size=1``)."""
        return self.text.split(" (", 1)[0]

    @property
    def field(self) -> str:
        return self.values[0][0]

    @property
    def value(self) -> Any:
        return self.values[0][1]


def _value(name: str, raw: str | None) -> Any:
    """A flag's value for config field ``name``; a ConfigError when it is none the field takes."""
    if name not in _fields():
        raise ConfigError(f"--{name}: not a setting")
    if raw is None:
        if field_type(name) is not bool:
            raise ConfigError(f"--{name}: needs a value")
        return True
    try:
        return coerce_value(name, raw, "--" + name)
    except (AssertionError, KeyError) as err:
        raise ConfigError(f"--{name}={raw}: {err}") from None


def fit_changes(fits: tuple[str, ...] | list[str], config: TrainConfig | None) -> list[FitChange]:
    """The engine's suggestions made only of concrete flags of the config, each of which would change it."""
    out: list[FitChange] = []
    for text in fits:
        flags = change_flags(text)
        try:
            values = tuple((name, _value(name, raw)) for name, raw in flags)
        except ConfigError:
            continue
        if not values or (config is not None and any(getattr(config, n, None) == v for n, v in values)):
            continue
        out.append(FitChange(text, values))
    return out[:MAX_SHOWN]


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def fitted_config(config: TrainConfig, change: FitChange, resume: bool) -> TrainConfig:
    """``config`` with exactly ``change``'s flags applied; resuming the last saved state, or as a new run."""
    changed = dataclasses.replace(config, **dict(change.values))
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
            yield Label("The run ran out of memory. Restart it with one of these changes:", classes="dialog-title",
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
