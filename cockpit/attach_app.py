"""The attach viewer's app: the monitor's live panels on a run folder, paced for a viewer.

It is a :class:`cockpit.monitor.MonitorApp` on a :class:`cockpit.viewer.tail.TailSource`: no editor,
and quitting leaves the run running. Imported by :func:`cockpit.attach.make_app` after the
snapshot prefetch has forked, since importing Textual is most of a viewer's start-up.
"""

from __future__ import annotations

from typing import Any, Callable

from textual import events as tevents
from textual.screen import Screen

from cockpit.monitor import MonitorApp
from cockpit.pace import BUSY_POLL, PLOT_EVERY, VIEW_INTERVAL, IdleCpu, ViewerPace
from cockpit.viewer.lifeline import Lifeline
from cockpit.state import ENDED
from cockpit.viewer.tail import TailSource

STAYS_PAUSED = "the run stays PAUSED; press space in any viewer to resume"


class AttachApp(MonitorApp):
    """The cockpit's live panels on a TailSource; quitting leaves the run running."""

    def __init__(self, source: TailSource, *, read_only: bool = False, refresh: float = VIEW_INTERVAL,
                 idle_cpu: Callable[[], float | None] | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.source: TailSource = source
        self.read_only = read_only
        self.pace = ViewerPace(refresh)
        self._idle_cpu = idle_cpu
        self._base_poll = source.poll_interval
        self._plot_drawn_at = -1e9
        self.lifeline = Lifeline(lambda: self.call_from_thread(self.exit, 0))
        self._quit_warned = False
        self._set_sub_title()

    @property
    def refresh_seconds(self) -> float:
        """Seconds between redraws now: --refresh, or BUSY_FACTOR times that while the CPU is busy."""
        return self.pace.interval

    def _set_sub_title(self) -> None:
        # what the viewer can do and the busy note first: a long run path is what a narrow header cuts off
        busy = self.pace.label()
        over = self.state.status in ENDED
        word = {"completed": "finished"}.get(self.state.status, self.state.status)
        parts = (["read-only"] if self.read_only else []) + ([word] if over else []) + ([busy] if busy else [])
        self.sub_title = " · ".join(parts + [f"attach {self.source.run_dir}"])

    def run_status_changed(self) -> None:
        self._set_sub_title()
        super().run_status_changed()

    # ------------------------------------------------------------------ the monitor's hooks
    def wire(self, main: Screen) -> None:
        # after the driver's own signal handlers: SIGTERM/SIGHUP end the viewer even mid-render; in a
        # browser tab (serve) also SIGINT, and the end of serve or of its pipe to us
        self.lifeline.install(_web_signals() if self.is_web else (), watch_parent=self.is_web)
        if self._idle_cpu is None:       # psutil loads after the first frame, not before it
            self.call_after_refresh(self._start_idle_meter)

    def schedule_redraws(self) -> None:
        self._arm()

    def begin(self) -> None:
        # a prefetched snapshot that has arrived is folded in now, so the first frame is the full one
        # (one chart render instead of an empty one and then the full one, no worker round trip)
        self.start_source(None, here=self.source.snapshot_ready())

    def chart_due(self, now: float, keys_changed: bool) -> bool:
        """Cheaper for a viewer on a run that logs many steps a second: the chart redraws every
        PLOT_EVERY refreshes (at once when the run's status changes). On a box the training saturates, a
        viewer's CPU comes out of the training's, hence this pacing and cockpit.pace (figures in
        bench/README.md)."""
        due = (now - self._plot_drawn_at >= PLOT_EVERY * self.refresh_seconds or keys_changed
               or not self.state.running)
        if due:
            self._plot_drawn_at = now
        return due

    def chart_lag_allowed(self) -> float:
        return self.refresh_seconds

    # ------------------------------------------------------------------ pacing
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
        self.drain()
        self._arm()

    # ------------------------------------------------------------------ keys
    def on_key(self, event: tevents.Key) -> None:
        if event.key in self.CONTROL_KEYS:
            refusal = self.source.control_refusal() if self.read_only or not self.state.running else None
            if refusal:
                self.notify(refusal, severity="warning", timeout=4)

    def action_quit_cockpit(self) -> None:
        held = self.state.running and (self.state.paused or self.state.pending == "pause")
        if held and not self._quit_warned:
            self._quit_warned = True      # the next q leaves: a viewer never stops or resumes the run
            self.notify(f"{STAYS_PAUSED}; q again quits", title="Quit?", severity="warning", timeout=8)
            return
        self.source.stop()
        self.exit(0)


def _web_signals() -> tuple[int, ...]:
    import signal

    return tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))
