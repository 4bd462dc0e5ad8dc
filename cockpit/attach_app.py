"""The attach viewer's app: the cockpit's live panels on a run folder, paced for a viewer."""

from __future__ import annotations

from typing import Any, Callable

from textual import events as tevents
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer, Header

from cockpit.app import CockpitApp
from cockpit.panels import CheckpointsPanel, LogPanel, LossPanel, MemoryPanel, ProgressPanel, compose_live_panels
from cockpit.pace import BUSY_POLL, PLOT_EVERY, VIEW_INTERVAL, IdleCpu, ViewerPace
from cockpit.viewer.tail import TailSource
from engine.api import SpykeError


class AttachApp(CockpitApp):
    """The cockpit's live panels on a TailSource: no form, no Start; quitting leaves the run running."""

    CONTROL_KEYS = ("space", "p", "s", "a", "ctrl+x")

    def __init__(self, source: TailSource, *, read_only: bool = False, refresh: float = VIEW_INTERVAL,
                 idle_cpu: Callable[[], float | None] | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.read_only = read_only
        self.pace = ViewerPace(refresh)
        self._idle_cpu = idle_cpu
        self._base_poll = source.poll_interval
        self._set_sub_title()

    @property
    def refresh_seconds(self) -> float:
        """Seconds between redraws now: --refresh, or BUSY_FACTOR times that while the CPU is busy."""
        return self.pace.interval

    def _set_sub_title(self) -> None:
        # the busy note first: a long run path is what the header cuts off on a narrow terminal
        busy = self.pace.label()
        parts = ([busy] if busy else []) + [f"attach {self.source.run_dir}"]
        self.sub_title = " · ".join(parts + (["read-only"] if self.read_only else []))

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="right"):
                yield from compose_live_panels()
        yield Footer()

    def on_mount(self, event: tevents.Mount) -> None:
        event.prevent_default()              # the base mount wires up the form, which attach has not
        main = self.screen
        self.panels = (main.query_one(ProgressPanel), main.query_one(LossPanel), main.query_one(MemoryPanel),
                       main.query_one(CheckpointsPanel), main.query_one(LogPanel))
        self._plot_panel = main.query_one(LossPanel)
        self._plot_drawn_at = -1e9
        self._bindings_key = None
        if self._idle_cpu is None:       # psutil loads after the first frame, not before it
            self.call_after_refresh(self._start_idle_meter)
        self._arm()
        self._render_state()
        self._start_in_flight = True
        self.commands_log.append("attach")
        if self.source.snapshot_ready():
            # the prefetched snapshot has arrived: fold it in now, so the first frame is the full one
            # (one chart render instead of an empty one and then the full one, no worker round trip)
            if self._start_source(None):
                self._drain()
        else:
            self._start_engine(None)

    def _arm(self) -> None:
        self.set_timer(self.pace.interval, self._tick)

    def _start_idle_meter(self) -> None:
        if self._idle_cpu is None:
            self._idle_cpu = IdleCpu()

    def _tick(self) -> None:
        """One redraw; first, whether the box had idle CPU since the last one sets the next pace."""
        if self._idle_cpu is not None and self.pace.observe(self._idle_cpu()):
            self.source.poll_interval = max(self._base_poll, BUSY_POLL) if self.pace.busy else self._base_poll
            self._set_sub_title()
        self._drain()
        self._arm()

    def _run_status_changed(self) -> None:
        self.refresh_bindings()

    def _render_state(self) -> None:
        """Like the cockpit's, but cheaper for a viewer on a run that logs many steps a second:
        the chart redraws every PLOT_EVERY refreshes (at once when the run's status changes) and the
        footer only when what the keys can do changes. On a box the training saturates, a viewer's
        CPU comes out of the training's, hence this pacing and cockpit.pace (figures in bench/README.md)."""
        now = self.clock()
        state = self.state
        key = (state.status, state.running, state.paused, state.pause_requested, state.abort_requested)
        plot_due = (now - self._plot_drawn_at >= PLOT_EVERY * self.refresh_seconds or key != self._bindings_key
                    or not state.running)
        for panel in self.panels:
            if panel is self._plot_panel:
                if not plot_due:
                    continue
                self._plot_drawn_at = now
            try:
                panel.show(state, now)
            except NoMatches:      # still composing, or torn down while the viewer exits
                continue
        if key != self._bindings_key:
            self._bindings_key = key
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "save_toml"):
            return False
        if action in ("toggle_pause", "save_now", "abort") and self.read_only:
            return None
        return super().check_action(action, parameters)

    def on_key(self, event: tevents.Key) -> None:
        if event.key in self.CONTROL_KEYS:
            refusal = self.source.control_refusal() if self.read_only or not self.state.running else None
            if refusal:
                self.notify(refusal, severity="warning", timeout=4)

    def _send(self, do: Callable[[], None]) -> None:
        try:
            do()
        except SpykeError as err:
            self.notify(str(err), severity="error", timeout=6)

    def action_toggle_pause(self) -> None:
        self._send(super().action_toggle_pause)

    def action_save_now(self) -> None:
        self._send(super().action_save_now)

    def _abort_chosen(self, choice: str | None, *, quit_after: bool) -> None:
        self._send(lambda: super(AttachApp, self)._abort_chosen(choice, quit_after=False))

    def action_quit_cockpit(self) -> None:
        self.source.stop()
        self.exit(0)
