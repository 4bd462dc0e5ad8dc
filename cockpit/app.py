"""The cockpit: the parameter form (presets, preview, demo, save TOML) beside the live panels.

The live panels, the drain and the run's keys are the monitor's (:class:`cockpit.monitor.MonitorApp`);
this app adds the editor and starts the run in this process. Nothing here imports torch: the
engine's heavy modules are imported in worker threads once the first frame is on screen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Select

from cockpit.form import ConfigForm
from cockpit.modals import SaveTomlScreen
from cockpit.monitor import MonitorApp, one_line
from cockpit.panels import PreviewPanel
from cockpit.sources import EventSource, LiveSource
from cockpit.fit_restart import can_fit_restart, offer_fit_restart
from cockpit.restart import RestartChoice, RestartOffer, RestartScreen, free_name, replaced_files, restart_config
from cockpit.state import ENDED, PlanPreviewed, StartRequested
from engine.api import LogMessage, SpykeError, TrainConfig, build_config, to_toml

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


@dataclass
class PreviewReady(Message):
    token: int
    plan: Any = None
    error: str | None = None


@dataclass
class DemoReady(Message):
    config: TrainConfig | None = None
    error: str | None = None


START = Binding("ctrl+r", "start", "Start", id="start", priority=True, tooltip="start training (when the form is valid)")
SAVE_TOML = Binding("ctrl+s", "save_toml", "Save TOML", id="save_toml", priority=True, tooltip="save the form as TOML")
TOGGLE_FORM = Binding("f", "toggle_form", "Form", id="toggle_form",
                      tooltip="show / hide the form (hidden on Start below 140 columns)")
FIT = Binding("m", "fit_restart", "Restart to fit", id="fit_restart",
              tooltip="out of memory: restart with one of the settings that would fit")
COLLAPSE_BELOW = 140        # a terminal narrower than this hides the form on Start: the run's panels get the room


class CockpitApp(MonitorApp, inherit_bindings=False):
    """The editor and the monitor of a run in this process."""

    # the monitor's keys with the editor's, in the footer's order (Start first, Save TOML after Abort)
    BINDINGS = [START, FIT, *MonitorApp.BINDINGS[:3], SAVE_TOML, TOGGLE_FORM, *MonitorApp.BINDINGS[3:]]

    def __init__(self, source: EventSource | None = None, *, config: TrainConfig | None = None,
                 config_path: Path | None = None, demo: bool = False, autostart: bool = False,
                 clock: Callable[[], float] = time.time, planner: Planner | None = None,
                 demo_preparer: DemoPreparer | None = None, presets_dir: Path | None = None,
                 keymap: dict[str, str] | None = None) -> None:
        super().__init__(source if source is not None else LiveSource(), clock=clock, keymap=keymap)
        self.initial_config = config
        self.config_path = Path(config_path) if config_path else None
        self.demo = demo
        self.autostart = autostart
        self.planner = planner or _default_planner
        self.demo_preparer = demo_preparer or _default_demo
        self.presets_dir = Path(presets_dir) if presets_dir is not None else DEFAULT_PRESETS
        self._preview_timer: Timer | None = None
        self._preview_token = 0
        self._form_valid = False
        self._plan: Any = None
        if config_path:
            self.sub_title = str(config_path)
        elif demo:
            self.sub_title = "demo"

    # ------------------------------------------------------------------ layout
    def compose_side(self) -> ComposeResult:
        with Vertical(id="left"):
            with Horizontal(id="preset-bar"):
                yield Select(self._preset_options(), prompt="preset…", id="preset", compact=True)
                yield Button("Save TOML", id="save-toml", compact=True)
                yield Button("Start", id="start", variant="success", compact=True, disabled=True)
            yield ConfigForm(self.initial_config, id="form")
            yield PreviewPanel(id="preview")

    def _preset_options(self) -> list[tuple[str, str]]:
        try:
            paths = sorted(self.presets_dir.glob("*.toml"))
        except OSError:
            paths = []
        return [(p.stem, str(p)) for p in paths]

    def wire(self, main: Screen) -> None:
        self.left = main.query_one("#left", Vertical)
        self.form = main.query_one(ConfigForm)
        self.preview = main.query_one(PreviewPanel)
        self.start_button = main.query_one("#start", Button)
        self.preset_select = main.query_one("#preset", Select)

    def begin(self) -> None:
        if self.demo and self.initial_config is None:
            self.preview.show_message("preparing the demo model and dataset…")
            self.call_after_refresh(self._prepare_demo)
        elif self.autostart:
            self.call_after_refresh(self._autostart)

    def run_status_changed(self) -> None:
        running = self.state.running
        self.form.set_enabled(not running)
        self.preset_select.disabled = running
        self._update_start_button()
        super().run_status_changed()

    def bindings_key(self) -> tuple:
        return super().bindings_key() + (self._form_valid, self._can_start())

    # ------------------------------------------------------------------ form
    @on(ConfigForm.Changed)
    def _form_changed(self, message: ConfigForm.Changed) -> None:
        self._form_valid = message.config is not None
        self._update_start_button()
        self.refresh_bindings()
        preview = self.preview
        if message.config is None:
            self._preview_token += 1
            self._plan = None
            self.apply(PlanPreviewed(0))
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
            self.post_message(PreviewReady(token, error=one_line(err)))
        else:
            self.post_message(PreviewReady(token, plan=plan))

    @on(PreviewReady)
    def _preview_ready(self, message: PreviewReady) -> None:
        if message.token != self._preview_token:
            return
        preview = self.preview
        if message.error:
            self._plan = None
            self.apply(PlanPreviewed(0))
            preview.show_message(message.error, error=True)
            return
        self._plan = message.plan
        try:
            self.apply(PlanPreviewed(int(getattr(message.plan, "total_steps", 0) or 0),
                                    int(getattr(message.plan, "num_epochs", 0) or 0)))
            preview.show_plan(message.plan)
        except Exception as err:  # noqa: BLE001 - an odd plan must not take the app down
            preview.show_message(f"preview unavailable: {one_line(err)}", error=True)

    def _update_start_button(self) -> None:
        self.start_button.disabled = not self._can_start()

    def _can_start(self) -> bool:
        return self.form.config is not None and not self.state.running and not self.starting and not self.quitting

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
            self.post_message(DemoReady(error=one_line(err)))
        else:
            self.post_message(DemoReady(config=config))

    @on(DemoReady)
    def _demo_ready(self, message: DemoReady) -> None:
        if not self.form.ready:              # the form mounts its later groups after the first frame
            self.set_timer(0.05, lambda: self._demo_ready(message))
            return
        if message.error or message.config is None:
            self.preview.show_message(f"demo not ready: {message.error}", error=True)
            self.apply(LogMessage(level="error", message=f"demo not ready: {message.error}", t=self.clock()))
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
            self.apply(LogMessage(level="error", message=f"--autostart: the config is not valid: {problems}",
                                   t=self.clock()))
            return
        self.action_start()

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "save_toml") and self.state.running:
            return False                      # not in the footer while a run is live: room for the run's keys
        if action == "start":
            return True if self._can_start() else None
        if action == "save_toml":
            return True if self._form_valid else None
        if action == "fit_restart":
            return can_fit_restart(self.state, getattr(getattr(self, "form", None), "config", None))
        return super().check_action(action, parameters)

    def action_fit_restart(self) -> None:
        offer_fit_restart(self)

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
        if isinstance(self.screen, RestartScreen):
            return
        offer = self._restart_offer(form.config)
        if offer is not None:       # the last run's files are where this one would write: ask first
            self.push_screen(RestartScreen(offer), callback=self._restart_chosen)
            return
        self._start_with(form.config)

    def _restart_offer(self, config: TrainConfig) -> RestartOffer | None:
        """What to ask when this Start would write where the run on screen has ended; None: just start."""
        s = self.state
        if s.status not in ENDED or not s.run_id or config.output_name != s.output_name:
            return None
        try:
            same_dir = Path(config.output_dir).expanduser().resolve() == Path(s.output_dir).expanduser().resolve()
        except (OSError, RuntimeError):
            same_dir = config.output_dir == s.output_dir
        if not same_dir:
            return None
        out = Path(s.output_dir)
        by_epochs = config.max_train_epochs is not None
        if by_epochs:
            done, planned = s.epoch, config.max_train_epochs or 0
        else:
            done, planned = s.step, config.max_train_steps
        default = max(planned * 2, done + 1) if done >= planned else planned
        names = [c.filename for c in getattr(self._plan, "checkpoints", [])] or [r.name for r in s.checkpoints]
        return RestartOffer(name=s.output_name, output_dir=s.output_dir, status=s.status, step=s.step,
                            total_field="max_train_epochs" if by_epochs else "max_train_steps",
                            total_default=default, total_floor=done,
                            can_continue=bool(s.last_state_dir or s.resume_hint),
                            suggested_name=free_name(out, s.output_name), replaced=replaced_files(out, names))

    def _restart_chosen(self, choice: RestartChoice | None) -> None:
        if choice is None or self.form.config is None:
            return
        self.form.set_config(restart_config(self.form.config, choice))    # the form says what runs
        if self.form.config is None:
            self.notify("fix the highlighted fields first", severity="warning")
            return
        self._start_with(self.form.config)

    def _start_with(self, config: TrainConfig) -> None:
        self.apply(StartRequested())
        self.start_source(config)
        self.form.set_enabled(False)
        self.preset_select.disabled = True
        self.set_focus(None)
        self._update_start_button()
        if self.size.width < COLLAPSE_BELOW:
            self.show_form(False)

    def show_form(self, shown: bool) -> None:
        self.left.display = shown

    def action_toggle_form(self) -> None:
        self.show_form(not self.left.display)

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
