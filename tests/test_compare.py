"""The compare screen, the samples panel, the `g` key and the contact sheet, on a fixed fake run."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from cockpit.attach import make_app as make_attach_app
from cockpit.cli import main as cli_main
from cockpit.compare import CompareApp, CompareScreen, ImageScreen
from cockpit.compare_run import load_run_state
from cockpit.images import HalfBlockImage, detect_mode, fit, halfblock_strips
from cockpit.sheet import HEADER_HEIGHT, LABEL_WIDTH, PAD, THUMB, sheet_size
from cockpit.viewer.snapshot import load_snapshot
from engine.api import SamplesSaved, ValidationLoss
from tests.fakes import FakeSource
from tests.sample_run import PROMPTS, STEPS, write_sample_run
from tests.test_cockpit_app import SIZE, make_app, settle, start_run, sync, valid_config


def run(app, body, size=SIZE):
    async def go():
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await body(pilot)
    asyncio.run(go())


# ---------------------------------------------------------------------------- reading the run
def test_the_snapshot_keeps_sample_and_validation_records(tmp_path):
    run_dir = write_sample_run(tmp_path)
    actions = load_snapshot(run_dir / "events.jsonl").actions
    assert sum(isinstance(a, SamplesSaved) for a in actions) == 3
    assert sum(isinstance(a, ValidationLoss) for a in actions) == 3
    state = load_run_state(run_dir)
    assert [s.step for s in state.sample_book.sets] == list(STEPS) and state.sample_book.best.step == 400


# ---------------------------------------------------------------------------- the screen
def test_compare_screen_snapshot(snap_compare, tmp_path):
    run_dir = write_sample_run(tmp_path)
    assert snap_compare(CompareApp(load_run_state(run_dir), title="sks"), terminal_size=(120, 40))


def test_arrows_move_enter_opens_escape_closes_and_best_is_marked(tmp_path):
    app = CompareApp(load_run_state(write_sample_run(tmp_path)), title="sks")
    seen = {}

    async def body(pilot):
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        assert [r.best for r in screen.rows] == [False, True, False]
        assert screen.selected == (1, 0)                         # starts on the best checkpoint
        assert "★" in str(screen.query(".cmp-row.-best .cmp-label").first().render())
        assert screen.cell(1, 0).has_class("-selected")
        await pilot.press("down", "right", "right", "right")      # clamped at the last prompt
        assert screen.selected == (2, 2) and screen.cell(2, 2).has_class("-selected")
        assert not screen.cell(1, 0).has_class("-selected")
        await pilot.press("up", "up", "up", "left")
        assert screen.selected == (0, 1)
        assert "step 200" in screen.selection_text() and PROMPTS[1] in screen.selection_text()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ImageScreen) and app.screen.path.endswith("_000200_01_20240101000000_1235.png")
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is screen
        await pilot.press("escape")                            # on its own, escape leaves
        await pilot.pause()
        seen["done"] = True

    run(app, body)
    assert seen["done"] and app.return_code == 0


def test_a_missing_image_file_is_named_in_its_cell(tmp_path):
    run_dir = write_sample_run(tmp_path)
    missing = next((tmp_path / "out" / "sample").glob("sks_000400_00_*.png"))
    missing.unlink()
    app = CompareApp(load_run_state(run_dir))

    async def body(pilot):
        cell = app.screen.cell(1, 0)
        assert cell._lines() == f"missing: {missing.name}"

    run(app, body)


def test_c_opens_the_compare_screen_from_the_cockpit_and_new_samples_show_up_in_it():
    app = make_app(config=valid_config())

    @sync
    async def go():
        async with app.run_test(size=SIZE) as pilot:
            await start_run(app, pilot)
            await pilot.press("c")
            await pilot.pause()
            assert isinstance(app.screen, CompareScreen) and app.screen.rows == ()
            app.source.emit(SamplesSaved(step=10, epoch=1, paths=["/o/a.png"], prompts=["cat"], seeds=[1], t=1.0))
            await settle(app, pilot)
            assert [r.step for r in app.screen.rows] == [10]
            await pilot.press("escape")
            assert not isinstance(app.screen, CompareScreen)
    go()


# ---------------------------------------------------------------------------- the samples panel and `g`
def test_the_samples_panel_appears_with_the_first_sample_set_on_a_tall_terminal_and_i_hides_it(tmp_path):
    png = tmp_path / "s.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png)
    app = make_app(config=valid_config())

    @sync
    async def go():
        async with app.run_test(size=(SIZE[0], 50)) as pilot:
            await start_run(app, pilot)
            assert not app.samples_visible
            app.source.emit(SamplesSaved(step=5, epoch=1, paths=[str(png), ""], prompts=["red", "broken"],
                                         seeds=[1, 2], errors=["", "bad prompt line"], t=2.0))
            await settle(app, pilot)
            assert app.samples_visible and app.samples_panel.display
            prompts = [str(w.render()) for w in app.samples_panel.query(".sample-prompt")]
            assert prompts == ["red", "broken"]
            images = list(app.samples_panel.query(HalfBlockImage))
            assert images[0].path == str(png) and images[1].note == "bad prompt line"
            assert "1 failed" in str(app.samples_panel.query_one("#samples-note").render())
            assert app.query_one("#memory").display                 # memory stays in view beside it
            await pilot.press("i")
            assert not app.samples_visible
    go()


def test_on_a_short_terminal_the_samples_panel_waits_for_i_and_memory_stays(tmp_path):
    app = make_app(config=valid_config())

    @sync
    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await start_run(app, pilot)
            app.source.emit(SamplesSaved(step=5, epoch=1, paths=[""], prompts=["red"], seeds=[1],
                                         errors=["bad prompt line"], t=2.0))
            await settle(app, pilot)
            assert not app.samples_visible and app.query_one("#memory").display
            await pilot.press("i")
            assert app.samples_visible and app.query_one("#memory").display
    go()


def test_g_in_the_cockpit_sends_sample_and_says_when():
    app = make_app(config=valid_config())

    @sync
    async def go():
        async with app.run_test(size=SIZE) as pilot:
            assert app.check_action("sample_now", ()) is None       # nothing to sample before a run
            await start_run(app, pilot)
            await pilot.press("g")
            await pilot.pause()
            assert app.source.commands[-1] == "sample"
            assert "samples at the next step boundary" in [n.message for n in app._notifications]
    go()


@pytest.mark.parametrize("read_only", [False, True])
def test_g_in_attach_writes_a_sample_command_unless_read_only(tmp_path, read_only):
    from tests.test_attach import synthetic_events, write_run

    run_dir = write_run(tmp_path, synthetic_events(20, pid=os.getpid(), finished=None, t0=time.time()))
    app = make_attach_app(run_dir, read_only=read_only)
    notes = []

    async def body(pilot):
        await pilot.pause(0.6)
        assert app.state.running
        await pilot.press("g")
        await pilot.pause(0.1)
        notes.extend(n.message for n in app._notifications)
        await pilot.press("q")

    run(app, body, size=(140, 45))
    sent = [json.loads(f.read_text())["command"] for f in (run_dir / "control").iterdir()]
    if read_only:
        assert sent == [] and any("read-only" in n for n in notes)
    else:
        assert sent == ["sample"] and "samples at the next step boundary" in notes


# ---------------------------------------------------------------------------- images in the terminal
def test_half_blocks_where_the_terminal_has_no_pixels_and_a_forced_mode_wins():
    assert detect_mode({}, stdout_is_tty=False) == "halfblock"                       # Pilot, serve, a pipe
    assert detect_mode({"TMUX": "/tmp/tmux-1/default,1,0", "TERM": "xterm-kitty"}, True) == "halfblock"
    assert detect_mode({"TERM": "screen-256color"}, True) == "halfblock"
    assert detect_mode({"TERM": "xterm-kitty"}, True) is None                         # ask the terminal
    assert detect_mode({"SPYKE_IMAGES": "sixel"}, False) == "sixel"


def test_half_block_cells_carry_the_upper_and_lower_pixel_colours(tmp_path):
    png = tmp_path / "two.png"
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    image.paste((0, 0, 255), (0, 4, 8, 8))                # top half red, bottom half blue
    image.save(png)
    strips = halfblock_strips(png, 4, 2)
    assert len(strips) == 2 and all(s.cell_length == 4 for s in strips)
    top, bottom = (list(s)[0].style for s in strips)
    assert top.color.triplet == (255, 0, 0) and top.bgcolor.triplet == (255, 0, 0)
    assert bottom.color.triplet == (0, 0, 255)
    assert fit((512, 256), 32, 16) == (32, 8)


# ---------------------------------------------------------------------------- the contact sheet
def test_sheet_has_the_grid_size_and_its_labels_are_drawn(tmp_path, capsys):
    run_dir = write_sample_run(tmp_path)
    out = tmp_path / "sheet.png"
    assert cli_main(["compare", str(run_dir), "--sheet", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"wrote {out} (") and "px" in printed
    with Image.open(out) as sheet:
        assert sheet.size == sheet_size(len(STEPS), len(PROMPTS))
        gray = sheet.convert("L")
        prompt_band = gray.crop((LABEL_WIDTH, 0, LABEL_WIDTH + THUMB, HEADER_HEIGHT))
        step_label = gray.crop((0, HEADER_HEIGHT, LABEL_WIDTH, HEADER_HEIGHT + 40))
        empty = gray.crop((0, 0, LABEL_WIDTH - PAD, HEADER_HEIGHT - PAD))     # no label above the label column
        assert prompt_band.getextrema()[0] != prompt_band.getextrema()[1]
        assert step_label.getextrema()[0] != step_label.getextrema()[1]
        assert empty.getextrema()[0] == empty.getextrema()[1]
        best_row_y = HEADER_HEIGHT + 1 * (THUMB + PAD)
        assert sheet.getpixel((2, best_row_y + 50))[:2] == (255, 196)          # the best row is framed in gold
        assert sheet.getpixel((2, HEADER_HEIGHT + 50)) != sheet.getpixel((2, best_row_y + 50))
    assert not list(tmp_path.glob(".sheet.png.*"))                            # no temporary file left


def test_sheet_refuses_to_overwrite_unless_told(tmp_path, capsys):
    run_dir = write_sample_run(tmp_path)
    out = tmp_path / "keep.png"
    out.write_bytes(b"user's file")
    assert cli_main(["compare", str(run_dir), "--sheet", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"spyke-cockpit: error: --sheet {out}: the file exists; pass --overwrite to replace it, "
                   "or choose another name\n")
    assert out.read_bytes() == b"user's file"
    assert cli_main(["compare", str(run_dir), "--sheet", str(out), "--overwrite"]) == 0
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"


def test_sheet_of_a_run_without_samples_says_how_to_get_them(tmp_path, capsys):
    from tests.test_attach import dead_pid, synthetic_events, write_run

    run_dir = write_run(tmp_path, synthetic_events(20, pid=dead_pid()))
    assert cli_main(["compare", str(run_dir), "--sheet", str(tmp_path / "s.png")]) == 2
    assert "--sample_prompts" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
