"""The monitor: a Textual app that shows a run's live panels and steers the run.

Engine → UI: the source's thread only ever appends to a deque (thread-safe, never blocks) and,
for discrete events (phase, checkpoint, log, start, finish), posts a message (also
thread-safe) so the UI drains at once. Per-step events wait for the next drain.
Everything the screen shows comes from :func:`cockpit.state.reduce`.

:class:`MonitorApp` is the base of the cockpit (:class:`cockpit.app.CockpitApp`, which adds the
editor) and of the attach viewer (:class:`cockpit.attach_app.AttachApp`, which paces itself for a
viewer). Subclasses extend it through the hooks below; the key help and the control keys are
read from the live bindings, so they cannot drift from what the keys do.

Its length is the bindings table (each key with its help line) and the hooks of its two subclasses;
the layout is ``cockpit.tcss``, the panels are ``cockpit.panels`` and ``cockpit.memory_panel``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header

from cockpit.images import graphics_mode
from cockpit.modals import SAVE_AND_STOP, ConfirmAbortScreen, HelpScreen
from cockpit.pace import Pace
from cockpit.panels import CheckpointsPanel, LogPanel, LossPanel, MemoryPanel, ProgressPanel, compose_live_panels
from cockpit.samples_panel import SamplesKeys, SamplesPanel
from cockpit.sources import EventSource
from cockpit.state import (ENDED, AbortRequested, CockpitState, PauseRequested, SaveRequested, SmoothingChanged,
                           StartFailed, reduce, resume_command)
from engine.api import Event, LogMessage, MemorySample, RunFinished, SpykeError, StepCompleted, TrainConfig

DRAIN_INTERVAL = 0.25       # seconds between drains of per-step events (4 Hz)
RENDER_INTERVAL = 0.5       # seconds between panel redraws while only steps arrive
CHART_INTERVAL = 1.0        # the shortest time between loss-chart redraws while training runs (the costly panel)
CHART_CPU_SHARE = 0.01      # ... and longer where one redraw costs more than this share of it: on a 2-core
                            # box the plotext build (~30 ms at 120x40) comes out of the training's CPU
CONTROL_ACTIONS = ("toggle_pause", "save_now", "abort", "sample_now")   # what steers the run (not the screen)
SHORT_ROWS = 32             # fewer rows than this: the compact layout (one-line borders, panels side by side)
SAVE_AT_BOUNDARY = "a checkpoint will be saved at the next step boundary"
SAVE_WHILE_PAUSED = "saving a checkpoint now (the run stays paused)"
KEY_NAMES = {"question_mark": "?", "left_square_bracket": "[", "right_square_bracket": "]"}


def one_line(err: BaseException) -> str:
    if isinstance(err, SpykeError):
        return str(err)
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def help_rows(bindings: list[Binding]) -> list[tuple[str, str]]:
    """One help row per binding with a tooltip, in order. A binding whose tooltip repeats the
    previous one's joins that row with its first key (``q / ctrl+c``, ``[ / ]``)."""
    rows: list[tuple[list[str], str]] = []
    for binding in bindings:
        if not binding.tooltip:
            continue
        keys = [KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(",")]
        if rows and rows[-1][1] == binding.tooltip:
            rows[-1][0].append(keys[0])
        else:
            rows.append((keys, binding.tooltip))
    return [(" / ".join(keys), text) for keys, text in rows]


def control_keys(bindings: list[Binding]) -> tuple[str, ...]:
    """The keys that steer the run."""
    return tuple(k.strip() for b in bindings if b.action in CONTROL_ACTIONS for k in b.key.split(","))


@dataclass
class EngineSignal(Message):
    """A discrete engine event arrived (the event is already in the buffer, in order)."""
    event: Event


@dataclass
class EngineStartDone(Message):
    error: str


class MonitorApp(SamplesKeys, App[int]):
    """The live panels on an :class:`EventSource`: drain, render, the control keys, help."""

    CSS_PATH = Path(__file__).resolve().parent / "cockpit.tcss"
    TITLE = "spyke-cockpit"

    BINDINGS = [
        Binding("space,p", "toggle_pause", "Pause/Resume", id="pause", key_display="space",
                tooltip="pause ⇄ resume (halts at the next step boundary, model stays loaded)"),
        Binding("s", "save_now", "Save now", id="save", tooltip="save a checkpoint now"),
        Binding("a,ctrl+x", "abort", "Abort", id="abort", tooltip="abort: save and stop / stop without saving / cancel"),
        Binding("g", "sample_now", "Samples", id="sample", show=False,
                tooltip="make sample images at the next step boundary"),
        Binding("c", "compare", "Compare", id="compare", show=False,
                tooltip="compare checkpoints: sample images × prompts, validation loss"),
        Binding("i", "toggle_samples", "Samples panel", id="samples_panel", show=False,
                tooltip="show / hide the samples panel (below the memory and log row)"),
        Binding("question_mark", "help", "Help", id="help", key_display="?", tooltip="this help"),
        Binding("q", "quit_cockpit", "Quit", id="quit", tooltip="quit (asks first while training)"),
        Binding("ctrl+c,ctrl+q", "quit_cockpit", "Quit", id="quit_priority", priority=True, show=False,
                tooltip="quit (asks first while training)"),
        *(Binding(key, f"smoothing({delta})", label, id=name, show=False, tooltip="less / more loss smoothing")
          for key, delta, label, name in (("left_square_bracket", -0.05, "Less smoothing", "smoothing_down"),
                                          ("right_square_bracket", 0.05, "More smoothing", "smoothing_up"))),
        Binding("l", "toggle_lr", "Loss/LR", id="toggle_lr", show=False, tooltip="chart: loss ⇄ learning rate"),
        Binding("y", "copy_resume", "Copy resume", id="copy_resume",
                tooltip="copy the resume command to the clipboard (OSC 52)"),
    ]
    CONTROL_KEYS = control_keys(BINDINGS)
    # the screen gets -narrow/-medium/-wide and -short/-tall classes; cockpit.tcss lays the panels out by them
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-medium"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (SHORT_ROWS, "-tall")]

    def __init__(self, source: EventSource, *, clock: Callable[[], float] = time.time,
                 keymap: dict[str, str] | None = None) -> None:
        super().__init__()
        graphics_mode()                   # asks the terminal, if at all, before Textual reads its answers
        self.source = source
        self.state = CockpitState()
        self.clock = clock
        self._keymap = keymap or {}
        self._buffer: collections.deque[Event] = collections.deque()
        self._bindings_key: Any = None
        self._rendered_at = float("-inf")
        self._chart_pace = Pace(CHART_INTERVAL, CHART_CPU_SHARE)
        self._quitting = False
        self._start_in_flight = False
        self._error_toasted: str | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def compose_side(self) -> ComposeResult:
        """Widgets left of the live panels (the cockpit's editor); none here."""
        yield from ()

    def wire(self, main: Screen) -> None:
        """Keep references to the subclass's widgets on the main screen (before the first render)."""

    def schedule_redraws(self) -> None:
        """Start the timer that drains the events and redraws (the live cockpit: 4 Hz)."""
        self.set_interval(DRAIN_INTERVAL, self.drain)

    def begin(self) -> None:
        """After the first render: what this app does first (start a source, prepare the demo…)."""

    def run_status_changed(self) -> None:
        """The run started or stopped."""
        self.refresh_bindings()

    def bindings_key(self) -> tuple:
        """What the keys' availability depends on; the footer is redrawn only when it changes."""
        s = self.state
        return (s.status, s.running, s.paused, s.pause_requested, s.abort_requested, s.pending,
                resume_command(s) is not None)

    def chart_due(self, now: float, keys_changed: bool) -> bool:
        """Whether this redraw draws the loss chart too (the costly panel): at most every CHART_INTERVAL
        while training runs, at once otherwise (paused, ended, keys changed). On a 2-core box the UI
        thread's CPU comes out of the training's (bench/bench_cockpit_throughput.py)."""
        # pacing runs on the monotonic clock; what is shown uses the app's injected clock
        forced = keys_changed or not self.state.running or self.state.paused
        self._chart_pace.spent(self.loss_panel.render_seconds)
        return self._chart_pace.due(time.monotonic(), force=forced)

    def chart_lag_allowed(self) -> float:
        """Seconds the chart may lag behind the progress line before the panel says how old it is (one
        skipped redraw is its normal pace, not a lag)."""
        return self._chart_pace.interval + RENDER_INTERVAL

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            yield from self.compose_side()
            with Vertical(id="right"):
                yield from compose_live_panels()
                yield SamplesPanel(id="samples")
        yield Footer()

    def on_mount(self) -> None:
        # The widgets live on the default screen; keep references so a modal on top does not hide them.
        main = self.screen
        self.panels = (main.query_one(ProgressPanel), main.query_one(LossPanel), main.query_one(MemoryPanel),
                       main.query_one(CheckpointsPanel), main.query_one(LogPanel))
        self.loss_panel = self.panels[1]
        self.samples_panel = main.query_one(SamplesPanel)
        self.panels += (self.samples_panel,)
        self.wire(main)
        if self._keymap:
            self.set_keymap(self._keymap)
        self.schedule_redraws()
        self.render_state()
        self.begin()

    # ------------------------------------------------------------------ help, for the screen and the tests
    def help_rows(self) -> list[tuple[str, str]]:
        """The key help, from this app's bindings."""
        return help_rows([b for b in self.BINDINGS if isinstance(b, Binding)])

    # ------------------------------------------------------------------ source → UI
    def _deliver(self, event: Event) -> None:
        """Called on the source's thread for every event. Never blocks, never raises."""
        self._buffer.append(event)
        if not isinstance(event, (StepCompleted, MemorySample)):
            try:
                self.post_message(EngineSignal(event))
            except Exception:  # noqa: BLE001 - the app may be closing; the timer drains anyway
                pass

    def drain(self) -> None:
        """Fold the events that arrived into the state; redraw (paced while only steps arrive)."""
        events = []
        buffer = self._buffer
        while buffer:
            events.append(buffer.popleft())
        if events:
            was_running = self.state.running
            state = self.state
            for event in events:
                state = reduce(state, event)
            self.state = state
            if was_running != state.running or any(isinstance(e, RunFinished) for e in events):
                self.run_status_changed()
        self._check_source_alive()
        # While steps stream in, panels redraw at RENDER_INTERVAL; anything else (a checkpoint, a phase,
        # pause, finish) is drawn at once. The UI thread's CPU is taken from training on small machines.
        now = time.monotonic()          # the injected clock is for what is shown, not for pacing
        steady = self.state.running and not self.state.paused and all(
            isinstance(e, (StepCompleted, MemorySample)) for e in events)
        if steady and now - self._rendered_at < RENDER_INTERVAL:
            return
        self._rendered_at = now
        self.render_state()

    def stop_buffering(self) -> None:
        """Nobody will drain any more (the terminal is gone): drop events instead of keeping them."""
        self._buffer = collections.deque(maxlen=0)

    @property
    def starting(self) -> bool:
        """A start of the source is under way (on a worker thread)."""
        return self._start_in_flight

    @property
    def quitting(self) -> bool:
        """Quit was asked for; the app leaves once the run has stopped."""
        return self._quitting

    def _check_source_alive(self) -> None:
        """A source that died without a final event must not leave the UI 'running'."""
        if (self.state.running and not self._start_in_flight and not self._buffer
                and not self.source.running):
            self.apply(RunFinished(status="failed", step=self.state.step,
                                   error="the engine stopped without reporting why (see the log)",
                                   t=self.clock()))

    @on(EngineSignal)
    def _engine_signal(self, message: EngineSignal) -> None:
        self.drain()
        event = message.event
        if isinstance(event, RunFinished):
            if event.status == "failed":
                if event.error != self._error_toasted:     # the engine's error line was toasted already
                    self.notify(event.error or "training failed", title="Training failed", severity="error",
                                timeout=10)
            elif event.status == "aborted":
                self.notify(f"stopped at step {event.step}", title="Aborted", severity="warning")
            else:
                self.notify(f"finished at step {event.step}", title="Done")
            self._error_toasted = None
        elif isinstance(event, LogMessage) and event.level == "error":
            self._error_toasted = event.message
            self.notify(event.message, severity="error", timeout=8)

    def notify(self, message: str, *, markup: bool = False, **kwargs: Any) -> None:
        """A toast; plain text unless asked (paths and hints such as ``[s]`` keep their brackets)."""
        super().notify(message, markup=markup, **kwargs)

    def apply(self, action: Any) -> None:
        """Fold one local action (or event) into the state and redraw."""
        was_running = self.state.running
        self.state = reduce(self.state, action)
        if was_running != self.state.running:
            self.run_status_changed()
        self.render_state()

    def render_state(self) -> None:
        now = self.clock()
        key = self.bindings_key()
        keys_changed = key != self._bindings_key
        chart = self.chart_due(now, keys_changed)
        state = self.state
        for panel in self.panels:
            if panel is self.loss_panel and not chart:
                try:
                    self.loss_panel.show_lag(state, self.chart_lag_allowed())
                except NoMatches:
                    pass
                continue
            try:
                panel.show(state, now)
            except NoMatches:      # a panel still composing, or torn down while the app exits
                continue
        self._show_samples(state)
        # Which keys apply depends only on the key; re-checking bindings per step costs a footer redraw.
        if keys_changed:
            self._bindings_key = key
            self.refresh_bindings()

    # ------------------------------------------------------------------ starting the source
    def start_source(self, config: TrainConfig | None, *, here: bool = False) -> None:
        """Start the source: on a worker thread (it may import torch or read a big file), or at once
        on this thread when ``here`` (and the events it delivered are drawn at once)."""
        self._start_in_flight = True
        if not here:
            self._start_worker(config)
        elif self._start(config):
            self.drain()

    @work(thread=True, exclusive=True, group="engine-start")
    def _start_worker(self, config: TrainConfig | None) -> None:
        self._start(config)

    def _start(self, config: TrainConfig | None) -> bool:
        """Start the source (on whichever thread calls this); the outcome arrives as EngineStartDone."""
        try:
            self.source.start(config, self._deliver)
        except Exception as err:  # noqa: BLE001 - shown in the app, never as a traceback
            self.post_message(EngineStartDone(one_line(err)))
            return False
        self.post_message(EngineStartDone(""))   # "" = started fine
        return True

    @on(EngineStartDone)
    def _start_done(self, message: EngineStartDone) -> None:
        self._start_in_flight = False
        if message.error:
            self.drain()
            self.apply(StartFailed(message.error))
            self.notify(message.error, title="Could not start", severity="error", timeout=10)
        self.run_status_changed()

    # ------------------------------------------------------------------ control
    def can_steer(self) -> bool:
        """Whether the run keys can ever act here: not on a read-only source, and not in a viewer
        of a run that is over (a cockpit that owns its runs can start another one)."""
        source = self.source
        if getattr(source, "read_only", False):
            return False
        return source.owns_run or not (self.state.status in ENDED or source.outcome() is not None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in CONTROL_ACTIONS:
            if not self.can_steer():
                return False               # hidden: nothing to steer here
            return True if self.state.running and not self.state.abort_requested else None
        if action == "copy_resume":
            return True if resume_command(self.state) else False
        return True

    def _command(self, send: Callable[[], None]) -> bool:
        """Send a command to the source; a refusal (SpykeError) is shown, not raised."""
        try:
            send()
        except SpykeError as err:
            self.notify(str(err), severity="error", timeout=6)
            return False
        return True

    def action_toggle_pause(self) -> None:
        if not self.state.running:
            return
        pause = not self.state.pause_requested
        if self._command(self.source.pause if pause else self.source.resume):
            self.apply(PauseRequested(pause))

    def action_save_now(self) -> None:
        if not self.state.running:
            return
        if self._command(self.source.save):
            self.apply(SaveRequested())
            # a paused engine serves a save at once; a training one after the step in flight
            self.notify(SAVE_WHILE_PAUSED if self.state.paused else SAVE_AT_BOUNDARY, timeout=3)

    def action_abort(self) -> None:
        if not self.state.running or self.state.abort_requested:
            return
        self.push_screen(ConfirmAbortScreen("Stop training?", f"at step {self.state.step}/{self.state.total_steps}"),
                         callback=lambda choice: self._abort_chosen(choice, quit_after=False))

    def action_quit_cockpit(self) -> None:
        if self._quitting:
            self.exit(0)         # second quit while waiting for the engine: leave now
            return
        if self.state.running and not self.state.abort_requested:
            self.push_screen(ConfirmAbortScreen("Quit: stop training first?",
                                                f"at step {self.state.step}/{self.state.total_steps}"),
                             callback=lambda choice: self._abort_chosen(choice, quit_after=True))
            return
        if self.state.running or self._start_in_flight:
            self._quitting = True
            self._join_then_exit()
            return
        self.exit(0)

    def _abort_chosen(self, choice: str | None, *, quit_after: bool) -> None:
        if choice is None:
            return
        save = choice == SAVE_AND_STOP
        if not self._command(lambda: self.source.abort(save)):
            return
        self.apply(AbortRequested(save))
        if quit_after:
            self._quitting = True
            self._join_then_exit()

    @work(thread=True, exclusive=True, group="join")
    def _join_then_exit(self) -> None:
        """Wait for the engine thread off the event loop, then exit."""
        while self._start_in_flight:
            time.sleep(0.05)
        self.source.wait(None)
        self.call_from_thread(self.exit, 0)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.help_rows()))

    def action_toggle_lr(self) -> None:
        mode = self.loss_panel.toggle_mode(self.state)
        self.notify("chart: learning rate" if mode == "lr" else "chart: loss", timeout=2)

    def action_copy_resume(self) -> None:
        command = resume_command(self.state)
        if not command:
            self.notify("nothing to resume yet (no saved training state)", severity="warning", timeout=4)
            return
        self.copy_to_clipboard(command)
        self.notify(command, title="Resume command copied (OSC 52)", timeout=6)

    def action_smoothing(self, delta: float) -> None:
        self.apply(SmoothingChanged(round(self.state.smoothing + float(delta), 3)))
