"""The cockpit: a Textual app with the parameter form beside the live panels.

Engine → UI: the engine thread only ever appends to a deque (thread-safe, never blocks) and,
for discrete events (phase, checkpoint, log, start, finish), posts a message (also
thread-safe) so the UI drains at once. Per-step events wait for the ~4 Hz drain timer.
Everything the screen shows comes from :func:`cockpit.state.reduce`.

Nothing here imports torch: the engine's heavy modules are imported in worker threads
once the first frame is on screen.
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
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Select

from cockpit.form import ConfigForm
from cockpit.modals import SAVE_AND_STOP, ConfirmAbortScreen, HelpScreen, SaveTomlScreen
from cockpit.panels import (CheckpointsPanel, LogPanel, LossPanel, MemoryPanel, PreviewPanel, ProgressPanel,
                            compose_live_panels)
from cockpit.sources import EventSource, LiveSource
from cockpit.state import (AbortRequested, CockpitState, PauseRequested, SaveRequested, SmoothingChanged,
                           StartFailed, StartRequested, reduce)
from engine.api import (Event, LogMessage, MemorySample, RunFinished, SpykeError, StepCompleted, TrainConfig,
                        build_config, to_toml)

DRAIN_INTERVAL = 0.25       # seconds between drains of per-step events (4 Hz)
RENDER_INTERVAL = 0.5       # seconds between panel redraws while only steps arrive
PREVIEW_DELAY = 0.35        # debounce of the live preview
DEFAULT_PRESETS = Path(__file__).resolve().parent.parent / "configs"

Planner = Callable[[TrainConfig], Any]
DemoPreparer = Callable[[], TrainConfig]


def _default_planner(config: TrainConfig) -> Any:
    from engine.api import plan_run

    return plan_run(config)


def _default_demo() -> TrainConfig:
    from engine.api import prepare_demo

    return prepare_demo()


def _one_line(err: BaseException) -> str:
    if isinstance(err, SpykeError):
        return str(err)
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class EngineSignal(Message):
    """A discrete engine event arrived (the event is already in the buffer, in order)."""
    event: Event


@dataclass
class EngineStartDone(Message):
    error: str


@dataclass
class PreviewReady(Message):
    token: int
    plan: Any = None
    error: str | None = None


@dataclass
class DemoReady(Message):
    config: TrainConfig | None = None
    error: str | None = None


class CockpitApp(App[int]):
    CSS_PATH = Path(__file__).resolve().parent / "cockpit.tcss"
    TITLE = "spyke-cockpit"

    BINDINGS = [
        Binding("ctrl+r", "start", "Start", id="start", priority=True),
        Binding("space,p", "toggle_pause", "Pause/Resume", id="pause"),
        Binding("s", "save_now", "Save now", id="save"),
        Binding("a,ctrl+x", "abort", "Abort", id="abort"),
        Binding("ctrl+s", "save_toml", "Save TOML", id="save_toml", priority=True),
        Binding("question_mark", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit_cockpit", "Quit", id="quit"),
        Binding("ctrl+c,ctrl+q", "quit_cockpit", "Quit", id="quit_priority", priority=True, show=False),
        Binding("left_square_bracket", "smoothing(-0.05)", "Less smoothing", id="smoothing_down", show=False),
        Binding("right_square_bracket", "smoothing(0.05)", "More smoothing", id="smoothing_up", show=False),
    ]

    HELP_ROWS = [
        ("ctrl+r / Start", "start training (when the form is valid)"),
        ("space / p", "pause ⇄ resume (halts at the next step boundary, model stays loaded)"),
        ("s", "save a checkpoint now"),
        ("a / ctrl+x", "abort: save and stop / stop without saving / cancel"),
        ("q / ctrl+c", "quit (asks first while training)"),
        ("ctrl+s", "save the form as TOML"),
        ("[ / ]", "less / more loss smoothing"),
        ("?", "this help"),
    ]

    def __init__(self, source: EventSource | None = None, *, config: TrainConfig | None = None,
                 config_path: Path | None = None, demo: bool = False, autostart: bool = False,
                 clock: Callable[[], float] = time.time, planner: Planner | None = None,
                 demo_preparer: DemoPreparer | None = None, presets_dir: Path | None = None,
                 keymap: dict[str, str] | None = None) -> None:
        super().__init__()
        self.source: EventSource = source if source is not None else LiveSource()
        self.state = CockpitState()
        self.clock = clock
        self.initial_config = config
        self.config_path = Path(config_path) if config_path else None
        self.demo = demo
        self.autostart = autostart
        self.planner = planner or _default_planner
        self.demo_preparer = demo_preparer or _default_demo
        self.presets_dir = Path(presets_dir) if presets_dir is not None else DEFAULT_PRESETS
        self._keymap = keymap or {}
        self._buffer: collections.deque[Event] = collections.deque()
        self._rendered_version = -1
        self._rendered_at = float("-inf")
        self._preview_timer: Timer | None = None
        self._preview_token = 0
        self._form_valid = False
        self._quitting = False
        self._start_in_flight = False
        self.commands_log: list[str] = []      # what the keys asked the engine to do (tests read it)
        if config_path:
            self.sub_title = str(config_path)
        elif demo:
            self.sub_title = "demo"

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="left"):
                with Horizontal(id="preset-bar"):
                    yield Select(self._preset_options(), prompt="preset…", id="preset", compact=True)
                    yield Button("Save TOML", id="save-toml", compact=True)
                    yield Button("Start", id="start", variant="success", compact=True, disabled=True)
                yield ConfigForm(self.initial_config, id="form")
                yield PreviewPanel(id="preview")
            with Vertical(id="right"):
                yield from compose_live_panels()
        yield Footer()

    def _preset_options(self) -> list[tuple[str, str]]:
        try:
            paths = sorted(self.presets_dir.glob("*.toml"))
        except OSError:
            paths = []
        return [(p.stem, str(p)) for p in paths]

    def on_mount(self) -> None:
        # The widgets live on the default screen; keep references so a modal on top does not hide them.
        main = self.screen
        self.form = main.query_one(ConfigForm)
        self.preview = main.query_one(PreviewPanel)
        self.start_button = main.query_one("#start", Button)
        self.preset_select = main.query_one("#preset", Select)
        self.panels = (main.query_one(ProgressPanel), main.query_one(LossPanel), main.query_one(MemoryPanel),
                       main.query_one(CheckpointsPanel), main.query_one(LogPanel))
        if self._keymap:
            self.set_keymap(self._keymap)
        self.set_interval(DRAIN_INTERVAL, self._drain)
        self._render_state()
        if self.demo and self.initial_config is None:
            self.preview.show_message("preparing the demo model and dataset…")
            self.call_after_refresh(self._prepare_demo)
        elif self.autostart:
            self.call_after_refresh(self._autostart)

    # ------------------------------------------------------------------ engine → UI
    def _deliver(self, event: Event) -> None:
        """Called on the engine thread for every event. Never blocks, never raises."""
        self._buffer.append(event)
        if not isinstance(event, (StepCompleted, MemorySample)):
            try:
                self.post_message(EngineSignal(event))
            except Exception:  # noqa: BLE001 - the app may be closing; the timer drains anyway
                pass

    def _drain(self) -> None:
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
                self._run_status_changed()
        self._check_engine_alive()
        # While steps stream in, panels redraw at RENDER_INTERVAL; anything else (a checkpoint, a phase,
        # pause, finish) is drawn at once. The UI thread's CPU is taken from training on small machines.
        now = time.monotonic()          # the injected clock is for what is shown, not for pacing
        steady = self.state.running and not self.state.paused and all(
            isinstance(e, (StepCompleted, MemorySample)) for e in events)
        if steady and now - self._rendered_at < RENDER_INTERVAL:
            return
        self._rendered_at = now
        self._render_state()

    def _check_engine_alive(self) -> None:
        """An engine thread that died without a final event must not leave the UI 'running'."""
        if (self.state.running and not self._start_in_flight and not self._buffer
                and not self.source.running):
            self._apply(RunFinished(status="failed", step=self.state.step,
                                    error="the engine stopped without reporting why (see the log)",
                                    t=self.clock()))

    @on(EngineSignal)
    def _engine_signal(self, message: EngineSignal) -> None:
        self._drain()
        if isinstance(message.event, RunFinished):
            event = message.event
            if event.status == "failed":
                self.notify(event.error or "training failed", title="Training failed", severity="error",
                            timeout=10)
            elif event.status == "aborted":
                self.notify(f"stopped at step {event.step}", title="Aborted", severity="warning")
            else:
                self.notify(f"finished at step {event.step}", title="Done")
        elif isinstance(message.event, LogMessage) and message.event.level == "error":
            self.notify(message.event.message, severity="error", timeout=8)

    def _apply(self, action: Any) -> None:
        was_running = self.state.running
        self.state = reduce(self.state, action)
        if was_running != self.state.running:
            self._run_status_changed()
        self._render_state()

    def _run_status_changed(self) -> None:
        running = self.state.running
        self.form.set_enabled(not running)
        self.preset_select.disabled = running
        self._update_start_button()
        self.refresh_bindings()

    def _render_state(self) -> None:
        now = self.clock()
        state = self.state
        for panel in self.panels:
            try:
                panel.show(state, now)
            except NoMatches:      # a panel still composing, or torn down while the app exits
                continue
        # Which keys apply depends only on these; re-checking bindings per step costs a footer redraw.
        key = (state.running, state.paused, state.pause_requested, state.abort_requested, state.status,
               self._form_valid, self._can_start())
        if key != self._rendered_version:
            self._rendered_version = key
            self.refresh_bindings()

    # ------------------------------------------------------------------ form
    @on(ConfigForm.Changed)
    def _form_changed(self, message: ConfigForm.Changed) -> None:
        self._form_valid = message.config is not None
        self._update_start_button()
        self.refresh_bindings()
        preview = self.preview
        if message.config is None:
            self._preview_token += 1
            n = len(message.problems)
            first = next(iter(message.problems.items()), None)
            detail = f": {first[0]} {first[1]}" if first else ""
            preview.show_message(f"{n} field{'s' if n != 1 else ''} to fix{detail}", error=True)
            return
        if self._preview_timer is not None:
            self._preview_timer.stop()
        self._preview_token += 1
        token = self._preview_token
        config = message.config
        self._preview_timer = self.set_timer(PREVIEW_DELAY, lambda: self._run_preview(config, token))

    @work(thread=True, exclusive=True, group="preview")
    def _run_preview(self, config: TrainConfig, token: int) -> None:
        try:
            plan = self.planner(config)
        except SpykeError as err:
            self.post_message(PreviewReady(token, error=str(err)))
        except Exception as err:  # noqa: BLE001 - a preview bug must not take the app down
            self.post_message(PreviewReady(token, error=_one_line(err)))
        else:
            self.post_message(PreviewReady(token, plan=plan))

    @on(PreviewReady)
    def _preview_ready(self, message: PreviewReady) -> None:
        if message.token != self._preview_token:
            return
        preview = self.preview
        if message.error:
            preview.show_message(message.error, error=True)
            return
        try:
            preview.show_plan(message.plan)
        except Exception as err:  # noqa: BLE001 - an odd plan must not take the app down
            preview.show_message(f"preview unavailable: {_one_line(err)}", error=True)

    def _update_start_button(self) -> None:
        self.start_button.disabled = not self._can_start()

    def _can_start(self) -> bool:
        return self.form.config is not None and not self.state.running and not self._start_in_flight and not self._quitting

    @on(Select.Changed, "#preset")
    def _preset_chosen(self, event: Select.Changed) -> None:
        event.stop()
        if event.select.is_blank():
            return
        path = Path(str(event.value))
        try:
            config = build_config(path)
        except SpykeError as err:
            self.notify(str(err), title="Preset not loaded", severity="error")
            self.preview.show_message(str(err), error=True)
            return
        self.config_path = path
        self.sub_title = str(path)
        self.form.set_config(config)

    # ------------------------------------------------------------------ demo / autostart
    @work(thread=True, exclusive=True, group="demo")
    def _prepare_demo(self) -> None:
        try:
            config = self.demo_preparer()
        except Exception as err:  # noqa: BLE001
            self.post_message(DemoReady(error=_one_line(err)))
        else:
            self.post_message(DemoReady(config=config))

    @on(DemoReady)
    def _demo_ready(self, message: DemoReady) -> None:
        if not self.form.ready:              # the form mounts its later groups after the first frame
            self.set_timer(0.05, lambda: self._demo_ready(message))
            return
        if message.error or message.config is None:
            self.preview.show_message(f"demo not ready: {message.error}", error=True)
            self._apply(LogMessage(level="error", message=f"demo not ready: {message.error}", t=self.clock()))
            return
        self.form.set_config(message.config)
        if self.autostart:
            self._autostart()

    def _autostart(self) -> None:
        form = self.form
        if not form.ready:
            self.set_timer(0.05, self._autostart)
            return
        form.validate_all()
        if form.config is None:
            problems = "; ".join(f"{k} {v}" for k, v in form.problems.items())
            self._apply(LogMessage(level="error", message=f"--autostart: the config is not valid: {problems}",
                                   t=self.clock()))
            return
        self.action_start()

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        running = self.state.running
        if action in ("toggle_pause", "save_now", "abort"):
            return True if running and not self.state.abort_requested else None
        if action == "start":
            return True if self._can_start() else None
        if action == "save_toml":
            return True if self._form_valid else None
        return True

    @on(Button.Pressed, "#start")
    def _start_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_start()

    @on(Button.Pressed, "#save-toml")
    def _save_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_save_toml()

    def action_start(self) -> None:
        form = self.form
        if not self._can_start() or form.config is None:
            if not self.state.running and form.problems:
                self.notify("fix the highlighted fields first", severity="warning")
            return
        config = form.config
        self._start_in_flight = True
        self.commands_log.append("start")
        self._apply(StartRequested())
        self.form.set_enabled(False)
        self.preset_select.disabled = True
        self.set_focus(None)
        self._update_start_button()
        self._start_engine(config)

    @work(thread=True, exclusive=True, group="engine-start")
    def _start_engine(self, config: TrainConfig) -> None:
        self._start_source(config)

    def _start_source(self, config: TrainConfig | None) -> bool:
        """Start the source (on whichever thread calls this); the outcome arrives as EngineStartDone."""
        try:
            self.source.start(config, self._deliver)
        except Exception as err:  # noqa: BLE001 - shown in the app, never as a traceback
            self.post_message(EngineStartDone(_one_line(err)))
            return False
        self.post_message(EngineStartDone(""))   # "" = started fine
        return True

    @on(EngineStartDone)
    def _start_done(self, message: EngineStartDone) -> None:
        self._start_in_flight = False
        if message.error:
            self._drain()
            self._apply(StartFailed(message.error))
            self.notify(message.error, title="Could not start", severity="error", timeout=10)
        self._run_status_changed()

    def action_toggle_pause(self) -> None:
        if not self.state.running:
            return
        pause = not self.state.pause_requested
        if pause:
            self.source.pause()
        else:
            self.source.resume()
        self.commands_log.append("pause" if pause else "resume")
        self._apply(PauseRequested(pause))

    def action_save_now(self) -> None:
        if not self.state.running:
            return
        self.source.save()
        self.commands_log.append("save")
        self._apply(SaveRequested())
        self.notify("a checkpoint will be saved at the next step boundary", timeout=3)

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
        self.source.abort(save)
        self.commands_log.append("abort" if save else "abort_no_save")
        self._apply(AbortRequested(save))
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
        self.push_screen(HelpScreen(self.HELP_ROWS))

    def action_smoothing(self, delta: float) -> None:
        self._apply(SmoothingChanged(round(self.state.smoothing + float(delta), 3)))

    def action_save_toml(self) -> None:
        form = self.form
        if form.config is None:
            self.notify("fix the highlighted fields first", severity="warning")
            return
        default = str(self.config_path) if self.config_path else "spyke.toml"
        config = form.config

        def done(path: str | None) -> None:
            if not path:
                return
            try:
                target = Path(path).expanduser()
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(to_toml(config), encoding="utf-8")
            except OSError as err:
                self.notify(f"{path}: {err.strerror or err}", title="Not saved", severity="error")
                return
            self.config_path = target
            self.sub_title = str(target)
            self.notify(f"saved {target}", title="Config saved")

        self.push_screen(SaveTomlScreen(default), callback=done)


def run_cockpit(config: TrainConfig | None, *, demo: bool, autostart: bool, config_path: Path | None,
                overrides: dict[str, Any] | None = None) -> int:
    """Entry point used by ``spyke-cockpit`` (cockpit/cli.py). Returns the process exit code.

    ``overrides`` (demo only) are typed config values applied on top of the demo's config.
    """
    def demo_with_overrides() -> TrainConfig:
        from engine.api import prepare_demo

        return prepare_demo(**(overrides or {}))

    preparer = demo_with_overrides if demo and overrides else None
    app = CockpitApp(LiveSource(), config=config, config_path=config_path, demo=demo, autostart=autostart,
                     demo_preparer=preparer)
    from cockpit.hangup import HangupGuard

    guard = HangupGuard(app)
    with guard:                 # the terminal going away (SIGHUP) closes the UI, not the run
        result = app.run()
    if guard.hung_up:
        return guard.detach()   # no terminal any more: train to the end, then exit
    if app.return_code not in (None, 0):
        return int(app.return_code)
    return int(result or 0)
