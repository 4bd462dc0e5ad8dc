"""The parameter form, generated from :mod:`engine.config` (groups, help, choices, validation).

Every edit re-validates the whole config at once: a value that does not parse, or a
``TrainConfig.problems()`` entry, is shown under its field and the form reports the
problems to the app (which keeps Start disabled while there are any).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static

from engine.config import GROUPS, TrainConfig, coerce_value, field_is_optional, field_type, fields_in_group
from engine.errors import ConfigError

_DEFAULTS = TrainConfig()


def _display(value: Any) -> str:
    if value is None:
        return ""
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
        self._filling = False

    # ------------------------------------------------------------------ build
    def compose(self) -> ComposeResult:
        for group, title in GROUPS.items():
            yield Static(title, classes="group-title")
            for f in fields_in_group(group):
                yield self._row(f, getattr(self._initial, f.name))

    def _row(self, f: Any, value: Any) -> Vertical:
        name = f.name
        meta = f.metadata
        kind = field_type(name)
        editor_id = f"field-{name}"
        if kind is bool:
            editor = Checkbox(name, value=bool(value), id=editor_id, classes="editor")
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
        help_text = meta.get("help", "") + (" [ours]" if meta.get("ours") else "")
        widgets = [w for w in (label, editor) if w is not None]
        # long names get their own line so the editor keeps a usable width
        line = (Vertical(*widgets, classes="field-line -stacked") if label is not None and len(name) > 20
                else Horizontal(*widgets, classes="field-line"))
        parts = [line,
                 Static(help_text, classes="help", markup=False),
                 Static("", classes="error", id=f"error-{name}", markup=False)]
        return Vertical(*parts, classes="field", id=f"row-{name}")

    def on_mount(self) -> None:
        self.validate_all()

    # ------------------------------------------------------------------ values
    def raw_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(TrainConfig):
            widget = self.query_one(f"#field-{f.name}")
            if isinstance(widget, Checkbox):
                out[f.name] = widget.value
            elif isinstance(widget, Select):
                out[f.name] = None if widget.is_blank() else widget.value
            else:
                out[f.name] = widget.value
        return out

    def validate_all(self) -> tuple[TrainConfig | None, dict[str, str]]:
        """Parse every field, then run the config's own checks; show each problem under its field."""
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
        for f in fields(TrainConfig):
            err = self.query_one(f"#error-{f.name}", Static)
            why = problems.get(f.name, "")
            err.update(f"⚠ {why}" if why else "")
            err.set_class(bool(why), "-shown")
            self.query_one(f"#row-{f.name}").set_class(bool(why), "-invalid")
        self.problems = problems
        self.config = config if not problems else None
        self.post_message(self.Changed(self, self.config, dict(problems)))
        return self.config, problems

    def set_config(self, config: TrainConfig) -> None:
        """Fill every field from ``config`` (e.g. a preset or the demo)."""
        with self.prevent(Input.Changed, Checkbox.Changed, Select.Changed):
            for f in fields(TrainConfig):
                value = getattr(config, f.name)
                widget = self.query_one(f"#field-{f.name}")
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
        self.validate_all()

    def set_enabled(self, enabled: bool) -> None:
        for widget in self.query(".editor"):
            widget.disabled = not enabled
