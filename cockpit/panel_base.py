"""The base of the live panels: a bordered panel that redraws only when the state's version moved."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.containers import Vertical

from cockpit.state import CockpitState


class Panel(Vertical):
    """A bordered panel with a title (``PANEL_TITLE``); subclasses implement :meth:`show`."""

    PANEL_TITLE: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = self.PANEL_TITLE
        self._version = -1

    def changed(self, state: CockpitState) -> bool:
        if state.version == self._version:
            return False
        self._version = state.version
        return True

    def show(self, state: CockpitState, now: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
