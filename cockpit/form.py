"""The parameter form, generated from :mod:`engine.config` (groups, help, choices, validation).

Every edit re-validates the whole config at once: a value that does not parse, or a
``TrainConfig.problems()`` entry, is shown under its field and the form reports the
problems to the app (which keeps Start disabled while there are any).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.content import Content
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static

from engine.api import (FIELDS, GROUPS, ConfigError, TrainConfig, coerce_value, field_is_optional, field_type,
                        fields_in_group)

_DEFAULTS = TrainConfig()
FIRST_FRAME_GROUPS = 1
OURS_TAG = "[ours]"
OURS_HELP = f"{OURS_TAG}: a spyke-cockpit option kohya does not have"       # the tooltip
OURS_LEGEND = f"{OURS_TAG} = not in kohya (spyke-cockpit only)"           # one line of the form's width


class PlainCheckbox(Checkbox):
    """A checkbox that reads the same in any terminal: ``[x]`` on, ``[ ]`` off (Textual's own is a
    coloured ``▐X▌`` either way, which looks ticked where the colours do not show)."""

    @property
    def _button(self) -> Content:
        return Content.styled("[x]" if self.value else "[ ]", self.get_visual_style("toggle--button"))


def _display(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # kohya's key=value lists (or paths, numbers), space-separated
        return shlex.join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value) if abs(value) >= 1e-4 or value == 0 else f"{value:g}"
    return str(value)


class ConfigForm(VerticalScroll):
    """One row per config field, grouped as in :data:`engine.config.GROUPS`."""

    @dataclass
    class Changed(Message):
        """Posted after every edit (and after :meth:`set_config`)."""
        form: "ConfigForm"
        config: TrainConfig | None
        problems: dict[str, str]

        @property
        def control(self) -> "ConfigForm":
            return self.form

    def __init__(self, config: TrainConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._initial = config or TrainConfig()
        self.problems: dict[str, str] = {}
        self.config: TrainConfig | None = None
        self._editors: dict[str, Any] = {}
        self._labels: dict[str, Label] = {}
        self._notes: dict[str, Static] = {}
        self._shown: dict[str, str] = {}
        self._pending: TrainConfig | None = None
        self.ready = False

    # ------------------------------------------------------------------ build
    def compose(self) -> ComposeResult:
        # Only the first groups are in the first frame; the rest mount right after it
        # (a full form is ~250 widgets, too many for a sub-second first frame).
        yield Static(Text(OURS_LEGEND, style="dim italic"), id="ours-help", classes="note")
        for group in list(GROUPS)[:FIRST_FRAME_GROUPS]:
            yield from self._group(group)

    def _group(self, group: str) -> ComposeResult:
        yield Static(GROUPS[group], classes="group-title")
        for f in fields_in_group(group):
            yield from self._row(f, getattr(self._initial, f.name))

    def on_mount(self) -> None:
        self.call_after_refresh(self._mount_rest)      # after the first frame has been painted

    def _mount_rest(self) -> None:
        widgets = [w for group in list(GROUPS)[FIRST_FRAME_GROUPS:] for w in self._group(group)]
        self.mount_all(widgets)   # not awaited: awaiting a mount from inside this pump's handler deadlocks
        self.call_after_refresh(self._became_ready)

    def _became_ready(self) -> None:
        self.ready = True
        if self._pending is not None:
            config, self._pending = self._pending, None
            self.set_config(config)
        else:
            self.validate_all()

    def _row(self, f: Any, value: Any) -> ComposeResult:
        name = f.name
        meta = f.metadata
        kind = field_type(name)
        editor_id = f"field-{name}"
        if kind is bool:
            editor: Any = PlainCheckbox(name, value=bool(value), id=editor_id, classes="editor")
            label = None
        elif meta.get("choices"):
            options = [(c, c) for c in meta["choices"]]
            optional = field_is_optional(name)
            editor = Select(options, value=value if value is not None else Select.NULL, allow_blank=optional,
                            compact=True, id=editor_id, classes="editor",
                            prompt="(default)" if optional else "Select")
            label = Label(name, classes="field-name")
        else:
            placeholder = "(unset)" if field_is_optional(name) else ""
            editor = Input(_display(value), placeholder=placeholder, compact=True, id=editor_id,
                           classes="editor")
            label = Label(name, classes="field-name")
        self._editors[name] = editor
        if label is None:
            yield editor
        else:
            self._labels[name] = label
            # long names get their own line so the editor keeps a usable width
            stacked = len(name) > 20
            yield (Vertical if stacked else Horizontal)(label, editor,
                                                       classes="field-line -stacked" if stacked else "field-line")
        note = Static(self._note(name, ""), classes="note", id=f"note-{name}")
        if f.metadata.get("ours"):
            note.tooltip = OURS_HELP
        self._notes[name] = note
        yield note

    def _note(self, name: str, why: str) -> Text:
        meta = FIELDS[name].metadata
        text = Text(meta.get("help", "") + (f" {OURS_TAG}" if meta.get("ours") else ""), style="dim")
        if why:
            text.append(f"\n⚠ {why}", style="bold red")
        return text

    # ------------------------------------------------------------------ values
    def raw_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, widget in self._editors.items():
            if isinstance(widget, Checkbox):
                out[name] = widget.value
            elif isinstance(widget, Select):
                out[name] = None if widget.is_blank() else widget.value
            else:
                out[name] = widget.value
        return out

    def error_for(self, name: str) -> str:
        return self.problems.get(name, "")

    def validate_all(self) -> tuple[TrainConfig | None, dict[str, str]]:
        """Parse every field, then run the config's own checks; show each problem under its field."""
        if not self.ready:
            return None, {"": "the form is still loading"}
        problems: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name, raw in self.raw_values().items():
            try:
                values[name] = coerce_value(name, raw, name)
            except ConfigError as err:
                problems[name] = str(err).split(": ", 1)[-1]
        config: TrainConfig | None = None
        if not problems:
            config = TrainConfig(**values)
            problems.update(config.problems())
        else:
            merged = {**_DEFAULTS.to_dict(), **values}
            for name, why in TrainConfig(**merged).problems().items():
                problems.setdefault(name, why)
        for name in self._editors:
            why = problems.get(name, "")
            if why == self._shown.get(name, ""):
                continue
            self._shown[name] = why
            self._notes[name].update(self._note(name, why))
            label = self._labels.get(name)
            if label is not None:
                label.set_class(bool(why), "-invalid")
        self.problems = problems
        self.config = config if not problems else None
        self.post_message(self.Changed(self, self.config, dict(problems)))
        return self.config, problems

    def set_config(self, config: TrainConfig) -> None:
        """Fill every field from ``config`` (e.g. a preset or the demo)."""
        if not self.ready:
            self._pending = config
            return
        with self.prevent(Input.Changed, Checkbox.Changed, Select.Changed):
            for name, widget in self._editors.items():
                value = getattr(config, name)
                if isinstance(widget, Checkbox):
                    widget.value = bool(value)
                elif isinstance(widget, Select):
                    widget.value = value if value is not None else Select.NULL
                else:
                    widget.value = _display(value)
        self.validate_all()

    # ------------------------------------------------------------------ edits
    @on(Input.Changed, ".editor")
    @on(Checkbox.Changed, ".editor")
    @on(Select.Changed, ".editor")
    def _edited(self, event: Message) -> None:
        event.stop()
        if self.ready:
            self.validate_all()

    def set_enabled(self, enabled: bool) -> None:
        self.disabled = not enabled     # children inherit it (one restyle, not one per field)
