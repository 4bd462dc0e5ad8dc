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


def test_only_suggestions_made_of_concrete_flags_that_change_the_config_are_offered():
    config = TrainConfig(train_batch_size=1, resolution="512", gradient_checkpointing=False)
    fits = ["--gradient_checkpointing (est. peak 6.1 GB, −1.4 GB)", "--resolution=384 (est. peak 6.9 GB, −0.6 GB)",
            "--train_batch_size=1", "a lower --resolution (now 512)", "--cache_latents", "--no_such_flag",
            "--mixed_precision=fp16", "--cache_latents --no_such_flag (est. peak 1.0 GB, −6.5 GB)",
            "--cache_latents --network_train_unet_only (est. peak 5.0 GB, −2.5 GB)"]
    got = [c.values for c in fit_changes(fits, config)]
    assert got == [(("gradient_checkpointing", True),), (("resolution", "384"),), (("cache_latents", True),),
                   (("mixed_precision", "fp16"),), (("cache_latents", True), ("network_train_unet_only", True))]
    assert fit_changes(fits, config)[0].text == "--gradient_checkpointing (est. peak 6.1 GB, −1.4 GB)"
    assert fit_changes(fits, config)[-1].flag == "--cache_latents --network_train_unet_only"


def test_the_chosen_change_resumes_the_saved_state_or_starts_a_new_run():
    config = TrainConfig(resume="", gradient_checkpointing=False)
    (change,) = fit_changes(["--gradient_checkpointing"], config)
    resumed = fitted_config(config, change, resume=True)
    assert resumed.gradient_checkpointing and resumed.resume == "latest" and resumed.resume_force
    fresh = fitted_config(config.replace(resume="latest", resume_force=True), change, resume=False)
    assert fresh.gradient_checkpointing and fresh.resume == "" and not fresh.resume_force


def test_a_combination_changes_exactly_its_flags_in_the_config():
    import dataclasses

    config = TrainConfig(gradient_checkpointing=False, train_batch_size=4)
    (change,) = fit_changes(["--gradient_checkpointing --train_batch_size=2 (est. peak 5.0 GB, −2.5 GB)"], config)
    before, after = dataclasses.asdict(config), dataclasses.asdict(fitted_config(config, change, resume=True))
    assert {k: after[k] for k in after if after[k] != before[k]} == {
        "gradient_checkpointing": True, "train_batch_size": 2, "resume": "latest", "resume_force": True}


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
    from engine.fit import preflight
    from engine.fit.advice import size
    from engine.fit.device_memory import DeviceMemory
    from engine.plan import plan_run

    budget = plan_run(config.replace(gradient_checkpointing=True)).memory.estimate.peak_bytes
    real_budget = preflight.device_memory          # the run could use just what checkpointing needs
    monkeypatch.setattr(preflight, "device_memory", lambda device, in_use=False: DeviceMemory(
        "cpu", budget, 10**11, "usable RAM") if in_use else real_budget(device))

    async def body():
        app = CockpitApp(config=config, presets_dir=Path("/nonexistent-presets"))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.form.ready and app.form.config is not None, "the form")
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: app.state.status == "failed", "the out-of-memory stop")
            await pilot.pause()
            state = app.state
            assert state.step == 1 and state.error.startswith("out of memory at step 2/3 (CUDA out of memory")
            assert f"to fit in {size(budget)} usable RAM: " in state.error and state.fits
            assert state.error.endswith(", ".join(state.fits))
            shown = " ".join(str(app.query_one("#progress-text", Static).render()).split())
            assert " ".join(state.error.split()) in shown                 # the FAILED screen shows the whole line
            assert "--gradient_checkpointing (est. peak " in shown
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
    import dataclasses

    first, restarted = dataclasses.asdict(starts[0]), dataclasses.asdict(starts[1])
    assert {k: v for k, v in restarted.items() if first[k] != v} == {     # exactly the change, and resume
        "gradient_checkpointing": True, "resume": "latest", "resume_force": True}
    (second,) = [e for e in events if isinstance(e, RunStarted)][1:]
    assert second.start_step == 1                                             # the saved state, not step 0
    assert state.step == 3 and state.final_path and Path(state.final_path).is_file()
