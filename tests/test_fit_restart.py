"""Out of memory in the cockpit: the FAILED screen names the settings that would fit and restarts the run with
the one chosen, put into the form, resuming the state the out-of-memory stop saved."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from textual.widgets import Checkbox, Static

from cockpit.app import CockpitApp
from cockpit.fit_restart import FitRestartScreen, fit_changes, fitted_config
from engine.config import TrainConfig
from engine.events import RunStarted

SIZE = (120, 40)


def test_only_concrete_flags_that_change_the_config_are_offered():
    config = TrainConfig(train_batch_size=1, resolution="512", gradient_checkpointing=False)
    fits = ["--gradient_checkpointing (−1.4 GB est.)", "--resolution=384 (−0.6 GB est.)", "--train_batch_size=1",
            "a lower --resolution (now 512)", "--cache_latents", "--no_such_flag", "--mixed_precision=fp16"]
    got = [(c.field, c.value) for c in fit_changes(fits, config)]
    assert got == [("gradient_checkpointing", True), ("resolution", "384"), ("cache_latents", True),
                   ("mixed_precision", "fp16")]
    assert fit_changes(fits, config)[0].text == "--gradient_checkpointing (−1.4 GB est.)"


def test_the_chosen_change_resumes_the_saved_state_or_starts_a_new_run():
    config = TrainConfig(resume="", gradient_checkpointing=False)
    (change,) = fit_changes(["--gradient_checkpointing"], config)
    resumed = fitted_config(config, change, resume=True)
    assert resumed.gradient_checkpointing and resumed.resume == "latest" and resumed.resume_force
    fresh = fitted_config(config.replace(resume="latest", resume_force=True), change, resume=False)
    assert fresh.gradient_checkpointing and fresh.resume == "" and not fresh.resume_force


async def wait_until(pilot, predicate, what: str, timeout: float = 180.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def test_out_of_memory_then_restart_with_a_suggested_change_resumes_and_trains(tiny_cache, tmp_path, monkeypatch):
    import engine.trainer as trainer_mod
    from engine.demo import prepare_demo

    real, starts, events = trainer_mod.Trainer, [], []

    def trainer(*args, **kwargs):              # the first run runs out of memory in step 2, the next trains
        starts.append(args[0])
        kwargs["sinks"] = [*kwargs.get("sinks", ()), events.append]
        if len(starts) == 1:
            def oom_at_2(step, loss):
                if step == 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return loss
            kwargs["loss_hook"] = oom_at_2
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer_mod, "Trainer", trainer)

    config = prepare_demo(tiny_cache, tmp_path, output_dir=str(tmp_path / "out"), resolution="64",
                          max_train_steps=3, max_train_epochs=None, save_every_n_steps=None, save_state=True,
                          gradient_checkpointing=False, seed=1).validate()

    async def body():
        app = CockpitApp(config=config, presets_dir=Path("/nonexistent-presets"))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.form.ready and app.form.config is not None, "the form")
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: app.state.status == "failed", "the out-of-memory stop")
            await pilot.pause()
            state = app.state
            assert state.step == 1 and state.error.startswith("out of memory at step 2/3 (CUDA out of memory")
            assert "--gradient_checkpointing" in state.error and state.fits
            assert "to fit, try: --gradient_checkpointing" in str(app.query_one("#progress-text", Static).render())
            app.set_focus(None)
            await pilot.press("m")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, FitRestartScreen) and screen.resume and screen.step == 1
            flags = [c.flag for c in screen.changes]
            assert "--gradient_checkpointing" in flags
            await pilot.press(str(flags.index("--gradient_checkpointing") + 1))
            await wait_until(pilot, lambda: len(starts) == 2, "the restart")
            assert app.form.config.gradient_checkpointing                     # the form holds the change
            assert app.form.query_one("#field-gradient_checkpointing", Checkbox).value
            await wait_until(pilot, lambda: app.state.status == "completed", "the restarted run")
            return app.state

    state = asyncio.run(body())
    restarted = starts[1]
    assert restarted.gradient_checkpointing and restarted.resume == "latest" and restarted.resume_force
    (second,) = [e for e in events if isinstance(e, RunStarted)][1:]
    assert second.start_step == 1                                             # the saved state, not step 0
    assert state.step == 3 and state.final_path and Path(state.final_path).is_file()
