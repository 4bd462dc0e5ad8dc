"""Pilot tests of the cockpit with a fake event source: keys → commands, events → panels, modals, form."""

from __future__ import annotations

import asyncio
import functools
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from textual.widgets import Button, DataTable, Input, RichLog, Select, Static

from cockpit.app import CockpitApp
from cockpit.modals import ConfirmAbortScreen, HelpScreen
from tests.fakes import FakeSource
from engine.config import TrainConfig
from engine.errors import ModelLoadError
from engine.events import (CheckpointSaved, LogMessage, MemorySample, PhaseChanged, RunFinished, RunStarted,
                           SamplesSaved, StepCompleted, ValidationLoss)

SIZE = (120, 40)
STEP_RE = re.compile(r"step \d+/\d+")
T0 = 1_700_000_000.0


def sync(fn):
    """Run an async test body in its own event loop (no pytest-asyncio in this project)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def valid_config(**changes) -> TrainConfig:
    values = dict(pretrained_model_name_or_path="/models/sd15", train_data_dir="/data/train", output_dir="/out",
                  output_name="plasma")
    return TrainConfig(**{**values, **changes})


def fake_plan(config: TrainConfig):
    return SimpleNamespace(
        subsets=[SimpleNamespace(image_dir="/data/train/10_plasma", num_images=12, num_repeats=10, is_reg=False)],
        batches_per_epoch=120, num_epochs=2, total_steps=240,
        checkpoints=[SimpleNamespace(step=120, epoch=1, kind="epoch", filename="plasma-000001.safetensors"),
                     SimpleNamespace(step=240, epoch=2, kind="final", filename="plasma.safetensors")],
        output_dir=config.output_dir, free_bytes=50 * 2**30, warnings=[])


def make_app(source=None, config=None, **kwargs) -> CockpitApp:
    kwargs.setdefault("presets_dir", Path("/nonexistent-presets"))
    return CockpitApp(source or FakeSource(), config=config, clock=lambda: T0 + 42, planner=fake_plan, **kwargs)


def run_started(total=100):
    return RunStarted(run_id="r1", output_dir="/out", output_name="plasma", total_steps=total, num_epochs=2,
                      batches_per_epoch=50, device="cpu", pid=1, config={}, checkpoint_steps=[50, 100], t=T0)


def text_of(app: CockpitApp, selector: str) -> str:
    return str(app.screen_stack[0].query_one(selector, Static).render())


async def settle(app, pilot, delay: float = 0.0) -> None:
    for _ in range(100):                      # the form mounts its later groups after the first frame
        if getattr(app, "form", None) is not None and app.form.ready:
            break
        await pilot.pause(0.02)
    await app.workers.wait_for_complete()
    await pilot.pause(delay or None)
    await pilot.pause()


async def start_run(app, pilot):
    await settle(app, pilot)
    await pilot.press("ctrl+r")
    await settle(app, pilot)
    app.source.emit(run_started(), PhaseChanged(phase="training", t=T0 + 1))
    await settle(app, pilot)


@sync
async def test_invalid_input_shows_why_and_blocks_start():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        start = app.query_one("#start", Button)
        assert not start.disabled and app.check_action("start", ()) is True
        field = app.query_one("#field-train_batch_size", Input)
        field.value = "two"
        await settle(app, pilot)
        assert start.disabled and app.check_action("start", ()) is None
        assert "must be int" in text_of(app, "#note-train_batch_size")
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert app.source.commands == []
        field.value = "0"
        await settle(app, pilot)
        assert "≥ 1" in text_of(app, "#note-train_batch_size") and start.disabled
        field.value = "2"
        await settle(app, pilot)
        assert text_of(app, "#note-train_batch_size").count("⚠") == 0 and not start.disabled


@sync
async def test_empty_form_names_the_missing_fields():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.query_one("#start", Button).disabled
        assert "is required" in text_of(app, "#note-pretrained_model_name_or_path")
        assert "to fix" in text_of(app, "#preview-text")


@sync
async def test_preview_shows_the_plan():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot, 0.5)
        await settle(app, pilot)
        preview = text_of(app, "#preview-text")
        assert "240 total steps" in preview and "plasma-000001.safetensors" in preview
        assert "12 images × 10" in preview


@sync
async def test_keys_send_the_right_commands_and_pause_reads_pausing_until_the_engine_confirms():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        assert app.check_action("toggle_pause", ()) is None       # dimmed before a run
        await start_run(app, pilot)
        source = app.source
        assert source.commands == ["start"] and source.configs[0].output_name == "plasma"
        assert app.check_action("toggle_pause", ()) is True and app.check_action("start", ()) is False  # hidden
        assert app.query_one("#field-output_name", Input).is_disabled   # form is read-only while training
        await pilot.press("space")
        await pilot.pause()
        assert source.commands[-1] == "pause" and "PAUSING…" in text_of(app, "#progress-text")
        assert "PAUSED" not in text_of(app, "#progress-text")              # the engine has not paused yet
        source.emit(PhaseChanged(phase="paused", t=T0 + 2))
        await settle(app, pilot)
        assert "PAUSED" in text_of(app, "#progress-text")
        await pilot.press("p")
        await pilot.pause()
        assert source.commands[-1] == "resume" and "RESUMING…" in text_of(app, "#progress-text")
        source.emit(PhaseChanged(phase="training", t=T0 + 3))
        await settle(app, pilot)
        assert "PAUSED" not in text_of(app, "#progress-text") and "RESUMING" not in text_of(app, "#progress-text")
        await pilot.press("s")
        assert source.commands[-1] == "save"


@sync
async def test_events_show_up_in_the_panels():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        steps = [StepCompleted(step=i, epoch=1, loss=1.0 / i, lrs={"unet": 1e-4}, step_seconds=0.5,
                               t=T0 + 2 + i * 0.5) for i in range(1, 51)]
        app.source.emit(*steps, MemorySample(device="cpu", rss=2**30, sys_used=2**33, sys_available=2**33,
                                             sys_total=2**34, t=T0 + 30))
        app.source.emit(CheckpointSaved(path="/out/plasma-step00000050.safetensors", step=50, epoch=1,
                                        bytes=3 * 2**20, kind="step", loss=0.02, verified=True, t=T0 + 30),
                        LogMessage(level="warning", message="loss spike at step 42", t=T0 + 31))
        await settle(app, pilot, 0.3)
        progress = text_of(app, "#progress-text")
        assert "step 50/100" in progress and "2.00 it/s" in progress and "ETA 00:25" in progress
        table = app.query_one("#checkpoints-table", DataTable)
        assert table.row_count == 1
        assert table.get_row_at(0)[:3] == ["50", "plasma-step00000050.safetensors", "3.0 MiB"]
        assert "RSS 1.0 GiB" in text_of(app, "#memory-text")
        log_text = "\n".join(line.text for line in app.query_one(RichLog).lines)
        assert "loss spike at step 42" in log_text
        assert len(app.state.history) == 50


@sync
async def test_the_abort_dialog_cancels_on_escape_and_n_stops_without_saving():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        source = app.source
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmAbortScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAbortScreen) and source.commands == ["start"]
        await pilot.press("ctrl+x")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
        assert source.commands[-1] == "abort_no_save" and "stopping" in text_of(app, "#progress-text")
        assert app.check_action("abort", ()) is None
        source.emit(RunFinished(status="aborted", step=7, t=T0 + 9))
        await settle(app, pilot)
        assert not app.query_one("#field-output_name", Input).is_disabled    # form usable again
        assert app.check_action("start", ()) is True


@sync
async def test_the_abort_dialogs_save_button_saves_then_stops():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        await pilot.press("a")
        await pilot.pause()
        await pilot.click("#confirm-save")
        await pilot.pause()
        assert app.source.commands[-1] == "abort"


@sync
async def test_quit_while_training_asks_then_waits_for_the_engine():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmAbortScreen)
        await pilot.press("s")
        await pilot.pause(0.2)
        assert app.source.commands[-1] == "abort" and app.is_running     # still waiting for the engine
        app.source.emit(RunFinished(status="aborted", step=3, t=T0 + 5))
        for _ in range(50):
            if not app.is_running:
                break
            await asyncio.sleep(0.05)
    assert app.return_code == 0


@sync
async def test_quit_when_idle_exits_at_once():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.set_focus(None)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@sync
async def test_engine_failure_is_a_message_not_a_crash():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        app.source.emit(RunFinished(status="failed", step=2, error="CUDA out of memory: lower train_batch_size",
                                    t=T0 + 4))
        await settle(app, pilot)
        assert "FAILED" in text_of(app, "#progress-text")
        assert "lower train_batch_size" in text_of(app, "#progress-text")
        assert not app.query_one("#field-train_batch_size", Input).is_disabled
        assert app.check_action("start", ()) is True


@sync
async def test_start_error_keeps_the_app_usable():
    source = FakeSource(start_error=ModelLoadError("/models/sd15: not found; give a diffusers folder"))
    app = make_app(source, config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert "not found" in text_of(app, "#progress-text") and app.state.status == "failed"
        assert not app.query_one("#start", Button).disabled


@sync
async def test_engine_thread_dying_silently_is_reported():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        app.source.finish()            # thread gone, no RunFinished
        await settle(app, pilot, 0.3)
        assert app.state.status == "failed" and "without reporting" in (app.state.error or "")


@sync
async def test_help_and_smoothing_keys():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.set_focus(None)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert app.state.smoothing == pytest.approx(0.95)


@sync
async def test_preset_select_loads_a_toml(tmp_path):
    (tmp_path / "plasma.toml").write_text(
        '[model]\npretrained_model_name_or_path = "/m"\n[dataset]\ntrain_data_dir = "/d"\ntrain_batch_size = 3\n')
    app = make_app(presets_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.query_one("#preset", Select).value = str(tmp_path / "plasma.toml")
        await settle(app, pilot)
        assert app.query_one("#field-train_batch_size", Input).value == "3"
        assert not app.query_one("#start", Button).disabled


@sync
async def test_save_toml_round_trips(tmp_path):
    target = tmp_path / "saved.toml"
    app = make_app(config=valid_config(network_dim=16))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.query_one("#save-path", Input).value = str(target)
        await pilot.click("#save-ok")
        await pilot.pause()
    data = tomllib.loads(target.read_text())
    assert data["network"]["network_dim"] == 16 and data["model"]["pretrained_model_name_or_path"] == "/models/sd15"


@sync
async def test_demo_fills_the_form_and_autostarts():
    app = make_app(demo=True, autostart=True, demo_preparer=lambda: valid_config(output_name="demo"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await settle(app, pilot)
        assert app.query_one("#field-output_name", Input).value == "demo"
        assert app.source.commands == ["start"]


@sync
async def test_remapped_keys_by_binding_id():
    app = make_app(config=valid_config(), keymap={"pause": "z"})
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        await pilot.press("z")
        await pilot.pause()
        assert app.source.commands[-1] == "pause"


async def planned_preview(app, pilot) -> str:
    """The form's preview once the real planner has filled it (it is debounced, then planned in a worker)."""
    await settle(app, pilot)
    for _ in range(200):
        if "total steps" in (preview := text_of(app, "#preview-text")):
            return preview
        await settle(app, pilot, 0.05)
    return preview


@sync
async def test_preview_shows_the_plan_warnings_such_as_a_caption_extension_mismatch(tmp_path):
    from PIL import Image

    from engine.plan import plan_run

    images = tmp_path / "train" / "2_spyke"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (90, 20, 20)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"spyke, pose {i}", encoding="utf-8")
    config = valid_config(pretrained_model_name_or_path=str(tmp_path), train_data_dir=str(images.parent),
                          output_dir=str(tmp_path / "out"))
    app = CockpitApp(FakeSource(), config=config, clock=lambda: T0, planner=plan_run,
                     presets_dir=Path("/nonexistent-presets"))
    async with app.run_test(size=SIZE) as pilot:
        preview = await planned_preview(app, pilot)
        assert "2 images × 2" in preview
        assert ("⚠ " f"{images}: 2 of 2 images have no .caption caption file but a .txt file beside them, so they "
                "train on the class tokens 'spyke' alone; set --caption_extension=.txt") in preview


def test_help_and_control_keys_come_from_the_bindings_of_each_app():
    from cockpit.attach_app import AttachApp

    cockpit_rows = dict(CockpitApp.help_rows(make_app()))
    assert cockpit_rows["ctrl+r"].startswith("start training") and cockpit_rows["ctrl+s"] == "save the form as TOML"
    assert {"space / p", "s", "a / ctrl+x", "g", "c", "i", "q / ctrl+c", "[ / ]", "?", "f", "l", "y"} <= set(cockpit_rows)
    attach_keys = {keys for keys, _ in AttachApp.help_rows(AttachApp.__new__(AttachApp))}
    assert attach_keys == {"space / p", "s", "a / ctrl+x", "g", "c", "i", "q / ctrl+c", "[ / ]", "?", "l",
                           "y"}   # no editor keys
    assert CockpitApp.CONTROL_KEYS == AttachApp.CONTROL_KEYS == ("space", "p", "s", "a", "ctrl+x", "g")


# ---------------------------------------------------------------- layout keys: f, y, l
@sync
async def test_form_hides_on_start_below_140_columns_and_f_toggles_it():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        left = app.query_one("#left")
        await settle(app, pilot)
        assert left.display
        await start_run(app, pilot)
        assert not left.display and app.query_one("#right").size.width == SIZE[0]
        await pilot.press("f")
        assert left.display
        await pilot.press("f")
        assert not left.display
    wide = make_app(config=valid_config())
    async with wide.run_test(size=(160, 40)) as pilot:
        await start_run(wide, pilot)
        assert wide.query_one("#left").display


@sync
async def test_y_copies_the_complete_resume_command_after_an_abort(monkeypatch):
    app = make_app(config=valid_config())
    copied = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=(80, 24)) as pilot:
        await start_run(app, pilot)
        await pilot.press("y")
        assert copied == []                              # nothing to resume while the run is live
        app.source.emit(CheckpointSaved(path="/out/plasma-step00000030.safetensors", step=30, epoch=1, bytes=10,
                                        kind="abort", verified=True, state_dir="/out/plasma-step00000030-state",
                                        t=T0 + 20),
                        RunFinished(status="aborted", step=30, t=T0 + 21))
        await settle(app, pilot)
        command = ("spyke-cockpit train --headless /out/.spyke/r1/config.toml "
                   "--resume /out/plasma-step00000030-state")
        await pilot.press("y")
        assert copied == [command]
        shown = text_of(app, "#progress-text")
        assert command in " ".join(shown.split())


@sync
async def test_l_switches_the_chart_between_loss_and_learning_rate():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        app.source.emit(*[StepCompleted(step=i, epoch=1, loss=1.0 / i, lrs={"unet": 1e-4 * i}, step_seconds=0.5,
                                        t=T0 + 2 + i * 0.5) for i in range(1, 21)])
        await settle(app, pilot, 0.3)
        panel, plot = app.loss_panel, app.query_one("#loss-plot")
        assert "loss" in str(panel.border_title) and plot.mode == "loss"
        await pilot.press("l")
        await pilot.pause()
        assert plot.mode == "lr" and str(panel.border_title).startswith("Learning rate") and "unet" in str(
            panel.border_title)
        await pilot.press("l")
        await pilot.pause()
        assert plot.mode == "loss" and str(panel.border_title).startswith("Loss")


@sync
async def test_checkpoint_table_adds_val_loss_and_samples_columns_only_when_the_run_has_them():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        table = app.query_one("#checkpoints-table", DataTable)
        for n in (10, 20, 30, 40, 50):
            app.source.emit(CheckpointSaved(path=f"/out/plasma-step{n:08d}.safetensors", step=n, epoch=1,
                                            bytes=10, kind="step", verified=True, t=T0 + n))
        await settle(app, pilot, 0.3)
        assert [str(c.label) for c in table.columns.values()] == ["step", "name", "size", "loss", "verified"]
        assert table.cursor_row == 4 and not table.show_horizontal_scrollbar
        app.source.emit(ValidationLoss(step=20, epoch=1, loss=0.2, images=4, t=T0 + 60),
                        ValidationLoss(step=50, epoch=1, loss=0.3, images=4, t=T0 + 61),
                        SamplesSaved(step=50, epoch=1, paths=["/a.png", "/b.png"], prompts=["a", "b"], seeds=[1, 2],
                                     checkpoint="/out/plasma-step00000050.safetensors", t=T0 + 62))
        await settle(app, pilot, 0.3)
        assert [str(c.label) for c in table.columns.values()][-2:] == ["val loss", "samples"]
        assert str(table.get_row_at(1)[-2]) == "★ 0.2000" and table.get_row_at(4)[-2:] == ["  0.3000", "2"]



# ---------------------------------------------------------------------------- status words, labels, keys
def footer_keys(app) -> dict[str, str]:
    """What the footer shows: description → key, for the keys that are there (enabled or dimmed)."""
    from textual.widgets._footer import FooterKey

    return {key.description: key.key_display for key in app.screen_stack[0].query(FooterKey)}


async def footer_key(app, pilot, description: str) -> str | None:
    """The footer's key for ``description`` once the footer has recomposed (it does so when the app is next
    idle after the focus or the bindings change, which a loaded machine delays)."""
    for _ in range(100):
        await pilot.pause()
        if description in footer_keys(app):
            break
        await pilot.pause(0.02)
    return footer_keys(app).get(description)


def recorded_toasts(app) -> list[str]:
    toasts: list[str] = []
    original = app.notify

    def notify(message, **kwargs):
        toasts.append(message)
        original(message, **kwargs)
    app.notify = notify
    return toasts


@sync
async def test_abort_dialog_buttons_show_their_key_hints():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        await pilot.press("a")
        await pilot.pause()
        labels = [str(app.screen.query_one(f"#confirm-{k}", Button).label) for k in ("save", "nosave", "cancel")]
        assert labels == ["Save and stop [s]", "Stop without saving [n]", "Cancel [esc]"]


@sync
async def test_the_save_toast_says_now_while_paused_and_at_the_boundary_while_training():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        toasts = recorded_toasts(app)
        await pilot.press("s")
        await pilot.pause()
        assert toasts[-1] == "a checkpoint will be saved at the next step boundary"
        await pilot.press("space")
        app.source.emit(PhaseChanged(phase="paused", t=T0 + 2))
        await settle(app, pilot)
        await pilot.press("s")
        await pilot.pause()
        assert toasts[-1] == "saving a checkpoint now (the run stays paused)"
        assert app.source.commands[-3:] == ["save", "pause", "save"]


@sync
async def test_the_planned_total_shows_before_start():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot, 0.5)
        await settle(app, pilot)
        assert "240 total steps" in text_of(app, "#preview-text")
        assert "step 0/240" in text_of(app, "#progress-text")


@sync
async def test_the_footer_spells_pause_with_space_before_and_during_training():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.set_focus(app.query_one("#field-allow_pickle"))        # a checkbox takes space for itself
        assert await footer_key(app, pilot, "Pause/Resume") == "space"
        await start_run(app, pilot)
        assert await footer_key(app, pilot, "Pause/Resume") == "space"


@sync
async def test_a_plan_that_arrives_as_the_app_closes_is_dropped_without_an_error():
    from cockpit.app import PreviewReady

    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        plan = app._plan
        await app.query_one("#preview-text").remove()          # the screen is being torn down
        app.post_message(PreviewReady(app._preview_token, plan=plan))
        app.post_message(PreviewReady(app._preview_token, error="the dataset folder is gone"))
        await settle(app, pilot)
        assert app.is_running and app._plan is None


@sync
async def test_a_checkbox_reads_ticked_or_not_without_colours():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        box = app.query_one("#field-allow_pickle")
        assert str(box.render()).startswith("[ ] allow_pickle")
        box.value = True
        await pilot.pause()
        assert str(box.render()).startswith("[x] allow_pickle")
        assert "[ours]" in text_of(app, "#note-allow_pickle")
        assert "[ours] = not in kohya" in text_of(app, "#ours-help")
        assert "kohya does not have" in str(app.query_one("#note-allow_pickle").tooltip)


# ---------------------------------------------------------------------------- starting again after a run ended
def finished_run(out: Path, *, status="completed", step=100, state_dir: str | None = "plasma-state"):
    """A run of 100 steps that ended in ``out``: its events, with a final checkpoint (and state)."""
    events = [RunStarted(run_id="r1", output_dir=str(out), output_name="plasma", total_steps=100, num_epochs=2,
                         batches_per_epoch=50, device="cpu", pid=1, config={}, checkpoint_steps=[50, 100], t=T0),
              PhaseChanged(phase="training", t=T0 + 1)]
    events += [StepCompleted(step=i, epoch=1, loss=1.0 / i, lrs={"unet": 1e-4}, step_seconds=0.1, t=T0 + 1 + i * 0.1)
               for i in range(1, step + 1)]
    events += [CheckpointSaved(path=str(out / "plasma.safetensors"), step=step, epoch=2, bytes=2**20, kind="final",
                               loss=0.01, verified=True, state_dir=str(out / state_dir) if state_dir else None,
                               t=T0 + 20),
               RunFinished(status=status, step=step, t=T0 + 21)]
    return events


async def finish_a_run(app, pilot, out: Path, **kwargs):
    await settle(app, pilot)
    await pilot.press("ctrl+r")
    await settle(app, pilot)
    app.source.emit(*finished_run(out, **kwargs))
    await settle(app, pilot)
    assert app.state.status == kwargs.get("status", "completed")


@pytest.mark.parametrize("choose, expect", [
    ("continue", dict(resume="latest", resume_force=True, max_train_steps=200, overwrite=False,
                      output_name="plasma")),
    ("new_name", dict(resume="", output_name="plasma-3", overwrite=False, max_train_steps=100)),
    ("overwrite", dict(resume="", output_name="plasma", overwrite=True, max_train_steps=100)),
])
@sync
async def test_start_after_a_run_ended_asks_and_starts_the_chosen_config(tmp_path, choose, expect):
    from cockpit.restart import RestartScreen

    (tmp_path / "plasma.safetensors").write_bytes(b"x")
    (tmp_path / "plasma-2.safetensors").write_bytes(b"x")         # NAME-2 is taken: NAME-3 is offered
    app = make_app(config=valid_config(output_dir=str(tmp_path), max_train_steps=100))
    async with app.run_test(size=SIZE) as pilot:
        await finish_a_run(app, pilot, tmp_path)
        shown = app.state
        await pilot.press("ctrl+r")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, RestartScreen) and app.state is shown and app.source.commands == ["start"]
        assert dialog.query_one("#restart-total", Input).value == "200"
        assert dialog.query_one("#restart-name", Input).value == "plasma-3"
        texts = " ".join(str(w.render()) for w in dialog.query(".restart-why"))
        assert "--resume latest --resume_force" in texts and "replaces plasma.safetensors" in texts
        await pilot.press({"continue": "c", "new_name": "n", "overwrite": "o"}[choose])
        await settle(app, pilot)
        assert app.source.commands == ["start", "start"]
        started = app.source.configs[-1]
        assert {k: getattr(started, k) for k in expect} == expect
        assert {k: getattr(app.form.config, k) for k in expect} == expect        # the form says what runs


@sync
async def test_cancelling_the_start_again_dialog_changes_nothing(tmp_path):
    app = make_app(config=valid_config(output_dir=str(tmp_path)))
    async with app.run_test(size=SIZE) as pilot:
        await finish_a_run(app, pilot, tmp_path)
        shown, progress = app.state, text_of(app, "#progress-text")
        await pilot.press("ctrl+r")
        await pilot.pause()
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.state is shown and text_of(app, "#progress-text") == progress and "FINISHED" in progress
        assert app.source.commands == ["start"] and app.query_one("#checkpoints-table", DataTable).row_count == 1


@sync
async def test_a_run_that_saved_no_state_cannot_be_continued_and_the_dialog_says_why(tmp_path):
    app = make_app(config=valid_config(output_dir=str(tmp_path)))
    async with app.run_test(size=SIZE) as pilot:
        await finish_a_run(app, pilot, tmp_path, state_dir=None)
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.screen.query_one("#restart-continue", Button).disabled
        assert "saved no training state" in " ".join(str(w.render()) for w in app.screen.query(".restart-why"))
        await pilot.press("c")
        await pilot.pause()
        assert app.source.commands == ["start"]


@sync
async def test_continuing_asks_for_a_total_above_what_is_trained(tmp_path):
    app = make_app(config=valid_config(output_dir=str(tmp_path), max_train_steps=100))
    async with app.run_test(size=SIZE) as pilot:
        await finish_a_run(app, pilot, tmp_path)
        await pilot.press("ctrl+r")
        await pilot.pause()
        app.screen.query_one("#restart-total", Input).value = "100"
        await pilot.press("c")
        await pilot.pause()
        assert "above 100" in str(app.screen.query_one("#restart-problem", Static).render())
        assert app.source.commands == ["start"]


@sync
async def test_a_start_with_another_output_name_needs_no_dialog(tmp_path):
    app = make_app(config=valid_config(output_dir=str(tmp_path)))
    async with app.run_test(size=SIZE) as pilot:
        await finish_a_run(app, pilot, tmp_path)
        app.query_one("#field-output_name", Input).value = "other"
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert app.source.commands == ["start", "start"] and app.source.configs[-1].output_name == "other"


@sync
async def test_an_error_the_engine_logged_is_toasted_once():
    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        toasts = recorded_toasts(app)
        app.source.emit(LogMessage(level="error", message="--output_dir=/out already holds plasma.safetensors",
                                   t=T0 + 2),
                        RunFinished(status="failed", step=0, error="--output_dir=/out already holds plasma.safetensors",
                                    t=T0 + 3))
        await settle(app, pilot)
        assert toasts == ["--output_dir=/out already holds plasma.safetensors"]


# ---------------------------------------------------------------------------- the real engine, tiny model
async def wait_until(pilot, predicate, what: str, timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


@sync
async def test_real_engine_pause_reads_pausing_until_confirmed_and_a_finished_run_stays_until_the_next_starts(
        tiny_cache, tmp_path):
    import threading

    from cockpit.restart import RestartScreen
    from cockpit.sources import LiveSource
    from engine.demo import prepare_demo

    class HeldSource(LiveSource):
        """The real engine; its first step waits (on the engine thread, inside the event sink) until the
        test has pressed space, so the pause is asked for while a run is surely in flight; a start after
        the first waits until the test lets it go."""
        def __init__(self):
            super().__init__()
            self.configs: list = []
            self.go = threading.Event()
            self.pause_pressed = threading.Event()

        def start(self, config, deliver):
            self.configs.append(config)
            if len(self.configs) > 1:
                self.go.wait(60)
                super().start(config, deliver)
                return

            def held(event):
                deliver(event)
                if isinstance(event, StepCompleted) and event.step == 1:
                    self.pause_pressed.wait(60)
            super().start(config, held)

    config = prepare_demo(tiny_cache, tmp_path, output_dir=str(tmp_path / "out"), resolution="64",
                          max_train_steps=6, max_train_epochs=None, save_every_n_steps=3, save_state=True,
                          gradient_checkpointing=False, seed=1).validate()
    source = HeldSource()
    app = CockpitApp(source, config=config, presets_dir=Path("/nonexistent-presets"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        shown: list[str] = []
        progress = app.query_one("#progress-text", Static)
        original_update = progress.update
        progress.update = lambda content="", **kw: (shown.append(str(content)), original_update(content, **kw))[1]
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.state.step >= 1, "the first step")
        await pilot.press("space")
        await pilot.pause()
        assert "PAUSING…" in shown[-1] and not app.state.paused    # the engine is still in its step
        source.pause_pressed.set()
        await wait_until(pilot, lambda: app.state.paused, "the engine's pause")
        await pilot.pause(0.3)
        paused_texts = [t for t in shown if "PAUSED" in t]
        assert paused_texts and "PAUSING…" in next(t for t in shown if "PAUS" in t)   # PAUSING… came first
        assert len({STEP_RE.search(t).group(0) for t in paused_texts}) == 1           # no step moved under PAUSED
        await pilot.press("space")
        await wait_until(pilot, lambda: app.state.status == "completed", "the end of the run")
        await settle(app, pilot)
        table = app.query_one("#checkpoints-table", DataTable)
        rows, history = table.row_count, len(app.state.history)
        assert rows == 3 and history == 6          # step 3, step 6, the final
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, RestartScreen)
        app.screen.query_one("#restart-total", Input).value = "9"
        await pilot.press("c")
        await pilot.pause(0.3)
        assert app.state.status == "starting"                       # held: the new run has not started yet
        assert table.row_count == rows and len(app.state.history) == history and "step 6/6" in str(progress.render())
        source.go.set()
        await wait_until(pilot, lambda: app.state.status == "completed" and app.state.total_steps == 9,
                         "the continued run")
        await settle(app, pilot)
        assert app.state.start_step == 6 and app.state.step == 9
        assert source.configs[-1].resume == "latest" and source.configs[-1].max_train_steps == 9
        assert (tmp_path / "out" / "spyke_demo.safetensors").exists()


@sync
async def test_preview_shows_the_memory_estimate_and_verdict(tiny_cache, tmp_path, monkeypatch):
    from engine.demo import prepare_demo
    from engine.fit import preflight
    from engine.fit.device_memory import DeviceMemory
    from engine.plan import plan_run

    monkeypatch.setattr(preflight, "device_memory", lambda device: DeviceMemory("mps", 16 * 10**9, 16 * 10**9,
                                                                                  "unified"))
    config = prepare_demo(root=tiny_cache, output_root=tmp_path)
    app = CockpitApp(FakeSource(), config=config, clock=lambda: T0, planner=plan_run,
                     presets_dir=Path("/nonexistent-presets"))
    async with app.run_test(size=SIZE) as pilot:
        preview = await planned_preview(app, pilot)
        assert "est. peak 0.5 GB of 16.0 GB unified · fits" in preview


def test_the_loss_chart_pace_draws_at_most_once_a_second_unless_forced():
    from cockpit.monitor import CHART_INTERVAL, RENDER_INTERVAL
    from cockpit.pace import Pace

    pace = Pace(CHART_INTERVAL)
    assert pace.due(100.0) is True                                  # the first redraw draws it
    assert pace.due(100.0 + RENDER_INTERVAL) is False               # half a second later: text panels only
    assert pace.due(100.0 + RENDER_INTERVAL, force=True) is True    # paused, ended, keys changed: at once
    assert pace.due(100.0 + RENDER_INTERVAL + CHART_INTERVAL - 0.01) is False
    assert pace.due(100.0 + RENDER_INTERVAL + CHART_INTERVAL) is True


def test_a_costly_chart_is_drawn_less_often_so_it_takes_at_most_its_share_of_a_core():
    from cockpit.monitor import CHART_CPU_SHARE, CHART_INTERVAL
    from cockpit.pace import Pace

    pace = Pace(CHART_INTERVAL, CHART_CPU_SHARE)
    pace.spent(CHART_INTERVAL * CHART_CPU_SHARE / 2)                # a cheap draw: the interval stays the floor
    assert pace.interval == CHART_INTERVAL
    pace.spent(0.03)                                                # 30 ms a draw: every 3 s at a 1 % share
    assert pace.interval == 0.03 / CHART_CPU_SHARE > CHART_INTERVAL
    assert pace.due(10.0) is True and pace.due(10.0 + pace.interval - 0.01) is False
    assert pace.due(10.0 + pace.interval - 0.01, force=True) is True  # paused, ended, keys changed: at once


@sync
async def test_a_chart_lagging_behind_the_run_says_how_old_it_is_and_an_ended_run_draws_it_at_once():
    import time

    from cockpit.monitor import CHART_INTERVAL
    from cockpit.panels import LossPanel

    app = make_app(config=valid_config())
    async with app.run_test(size=SIZE) as pilot:
        await start_run(app, pilot)
        assert app.chart_lag_allowed() > CHART_INTERVAL          # its own pace is not reported as a lag
        panel = app.screen_stack[0].query_one(LossPanel)
        app.source.emit(StepCompleted(step=2, epoch=1, loss=0.9, lrs={}, step_seconds=0.5, t=T0 + 3))
        await settle(app, pilot, 0.3)
        panel._plotted_at = time.monotonic() - 5.2                 # the chart was last drawn 5 s ago
        panel._plotted_version = -1
        panel.show_lag(app.state, app.chart_lag_allowed())
        assert "chart updated 5s ago" in str(panel.border_title)
        app.source.emit(RunFinished(status="completed", step=2, t=T0 + 4))
        await settle(app, pilot, 0.3)
        assert app.chart_due(T0, False) is True                   # ended: every redraw draws it
        assert "chart updated" not in str(panel.border_title)
