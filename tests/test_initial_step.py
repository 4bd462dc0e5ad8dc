"""kohya's --initial_step, --initial_epoch and --skip_until_initial_step on the tiny model: step numbers,
epoch numbers, the learning-rate curve and the file names against a hand count (4 images, batch 1: 4 steps
an epoch), and that skipped steps train nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.config import TrainConfig
from engine.config_io import build_config
from engine.errors import ConfigError
from engine.events import LogMessage, RunStarted, StepCompleted
from engine.plan import plan_run
from engine.tiny import generate_dataset

NAME = "start"
BASE_LR = 1e-3
SPE = 4   # steps per epoch


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_cache):
    small = generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)
    return {"model": tiny_cache / "tiny-sd15", "small": small}


def make_config(assets, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(assets["model"]), dataset_config=str(assets["small"].dataset_toml),
                  resolution="64", max_train_steps=10, output_dir=str(out), output_name=NAME, network_dim=4,
                  network_alpha=2.0, learning_rate=BASE_LR, unet_lr=BASE_LR, text_encoder_lr=BASE_LR,
                  lr_scheduler="linear", seed=7, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def train(cfg):
    from engine.trainer import Trainer

    events: list = []
    trained: list[int] = []

    def count(step, loss):    # called once per forward pass of a trained step
        trained.append(step)
        return loss

    result = Trainer(cfg, sinks=[events.append], loss_hook=count).run()
    assert result.status == "completed", result.error
    return result, events, trained


def files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors"))


def metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_skip_until_initial_step_trains_from_step_s_plus_one_with_true_numbers(assets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(assets, out, initial_step=5, skip_until_initial_step=True, save_every_n_steps=3,
                      save_every_n_epochs=1)
    result, events, trained = train(cfg)
    steps = [e for e in events if isinstance(e, StepCompleted)]
    assert trained == [6, 7, 8, 9, 10]                  # steps 1-5 are skipped: no forward pass, no update
    assert [e.step for e in steps] == [6, 7, 8, 9, 10] and result.global_step == 10
    assert [e.epoch for e in steps] == [2, 2, 2, 3, 3]   # step 5 is the second batch of epoch 2
    # the schedule is not moved (kohya): linear over 10 steps, starting from its beginning at step 6
    assert [e.lrs["unet"] for e in steps] == pytest.approx([BASE_LR * (1 - k / 10) for k in range(5)])
    # step files past step 5 only; epoch 2's file at step 8; epoch 3 is the last (the final file)
    assert files(out) == [f"{NAME}-000002.safetensors", f"{NAME}-step00000006.safetensors",
                          f"{NAME}-step00000009.safetensors", f"{NAME}.safetensors"]
    assert (metadata(out / f"{NAME}.safetensors")["ss_steps"], metadata(out / f"{NAME}.safetensors")["ss_epoch"]) == (
        "10", "3")
    assert metadata(out / f"{NAME}-000002.safetensors")["ss_steps"] == "8"
    [started] = [e for e in events if isinstance(e, RunStarted)]
    assert (started.start_step, started.total_steps) == (5, 10)
    assert any(isinstance(e, LogMessage) and e.message.startswith("--initial_step: skipping the first 5 steps")
               for e in events)


def test_initial_epoch_without_skipping_moves_only_the_epoch_number(assets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(assets, out, max_train_steps=1600, max_train_epochs=3, lr_scheduler="cosine",
                      initial_epoch=2, save_every_n_steps=3, save_every_n_epochs=1)
    result, events, trained = train(cfg)
    steps = [e for e in events if isinstance(e, StepCompleted)]
    # kohya: epochs 2 and 3 are trained in full, the step count starts at 0, the run ends with its epochs
    assert trained == list(range(1, 9)) and [e.step for e in steps] == list(range(1, 9))
    assert [e.epoch for e in steps] == [2] * 4 + [3] * 4 and result.global_step == 8
    # the schedule spans all 12 steps of the 3 epochs and starts at its beginning
    assert [e.lrs["unet"] for e in steps] == pytest.approx(
        [BASE_LR * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(8)])
    assert files(out) == [f"{NAME}-000002.safetensors", f"{NAME}-step00000003.safetensors",
                          f"{NAME}-step00000006.safetensors", f"{NAME}.safetensors"]
    assert metadata(out / f"{NAME}-000002.safetensors")["ss_steps"] == "4"
    final = metadata(out / f"{NAME}.safetensors")
    assert (final["ss_steps"], final["ss_epoch"]) == ("8", "3")
    [started] = [e for e in events if isinstance(e, RunStarted)]
    assert (started.start_step, started.total_steps) == (0, 8)


def test_the_plan_names_what_an_initial_epoch_run_writes(assets, tmp_path):
    plan = plan_run(make_config(assets, tmp_path, max_train_epochs=4, initial_epoch=3, save_every_n_epochs=1))
    assert [(c.step, c.epoch, c.filename) for c in plan.checkpoints] == [
        (4, 3, f"{NAME}-000003.safetensors"), (8, 4, f"{NAME}.safetensors")]
    assert (plan.total_steps, plan.last_step) == (16, 8)
    plan = plan_run(make_config(assets, tmp_path, initial_step=5, skip_until_initial_step=True, save_every_n_steps=3,
                                save_every_n_epochs=1))
    assert [(c.step, c.epoch, c.filename) for c in plan.checkpoints] == [    # nothing at the skipped steps
        (6, 2, f"{NAME}-step00000006.safetensors"), (8, 2, f"{NAME}-000002.safetensors"),
        (9, 3, f"{NAME}-step00000009.safetensors"), (10, 3, f"{NAME}.safetensors")]


def test_resume_with_initial_step_ignores_the_states_step_and_keeps_its_schedule(assets, tmp_path):
    out = tmp_path / "out"
    train(make_config(assets, out, save_every_n_steps=4, save_state=True))
    state = out / f"{NAME}-step00000004-state"
    # the same run resumed from its step-4 state, placed at step 2 by the flag
    cfg = make_config(assets, out, save_every_n_steps=4, save_state=True, resume=str(state), initial_step=2,
                      skip_until_initial_step=True)
    result, events, trained = train(cfg)
    steps = [e for e in events if isinstance(e, StepCompleted)]
    assert trained == list(range(3, 11)) and result.global_step == 10
    warnings = [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    assert any("the state's step (4) is ignored because --initial_step/--initial_epoch is given" in w
               for w in warnings)
    # the schedule goes on from the state's (4 steps into linear over 10), not from the flag's step
    assert [e.lrs["unet"] for e in steps] == pytest.approx([BASE_LR * max(0.0, 1 - k / 10) for k in range(4, 12)])


def test_initial_step_at_or_past_the_total_is_one_line(assets, tmp_path):
    with pytest.raises(ConfigError) as err:
        plan_run(make_config(assets, tmp_path, initial_step=10))
    assert str(err.value) == ("--initial_step=10: must be below the run's 10 steps (kohya: max_train_steps should be "
                              "greater than initial step); lower it or train longer")
    with pytest.raises(ConfigError, match=r"^--initial_epoch=4 \(step 12\): must be below the run's 10 steps"):
        plan_run(make_config(assets, tmp_path, initial_epoch=4))


def test_initial_step_zero_and_initial_epoch_one_change_nothing(assets, tmp_path):
    for flags in ({"initial_step": 0}, {"initial_epoch": 1}, {"initial_epoch": 0}):   # kohya: (0 - 1) × N, no step
        plan = plan_run(make_config(assets, tmp_path, save_every_n_epochs=1, **flags))
        assert plan.start is None and plan.last_step == 10


def test_the_flags_parse_from_kohyas_command_line_and_refuse_bad_values():
    from engine.cli_args import make_parser, parse_train_args

    _, config = parse_train_args(make_parser("spyke-cockpit train", ""), [
        "--initial_epoch", "3", "--initial_step=7", "--skip_until_initial_step"])
    assert (config.initial_epoch, config.initial_step, config.skip_until_initial_step) == (3, 7, True)
    bad = build_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "initial_step": -2})
    with pytest.raises(ConfigError, match=r"^--initial_step must be ≥ 0 \(got -2\)$"):
        bad.validate()


def test_the_cockpits_resume_actions_drop_the_flags_so_the_state_places_the_run():
    from cockpit.fit_restart import fit_changes, fitted_config
    from cockpit.restart import CONTINUE, RestartChoice, restart_config

    config = TrainConfig(initial_step=5, initial_epoch=2, skip_until_initial_step=True, max_train_steps=10)
    continued = restart_config(config, RestartChoice(CONTINUE, total=20))
    assert (continued.resume, continued.initial_step, continued.initial_epoch, continued.max_train_steps) == (
        "latest", None, None, 20)
    (change,) = fit_changes(["--gradient_checkpointing"], config)
    resumed = fitted_config(config, change, resume=True)
    assert (resumed.resume, resumed.initial_step, resumed.initial_epoch) == ("latest", None, None)
    assert fitted_config(config, change, resume=False).initial_step == 5   # a new run keeps what was asked


def test_skipping_counts_optimizer_steps_under_gradient_accumulation(assets, tmp_path):
    # 4 batches an epoch, 2 per step: 2 steps an epoch; step 3 ends in epoch 2, so epoch 2's second step is next
    # (kohya's loop would skip gradient_accumulation_steps times too many epochs here and train nothing)
    cfg = make_config(assets, tmp_path / "out", max_train_steps=6, gradient_accumulation_steps=2, initial_step=3,
                      skip_until_initial_step=True)
    result, events, trained = train(cfg)
    steps = [e for e in events if isinstance(e, StepCompleted)]
    assert trained == [4, 4, 5, 5, 6, 6]                # two batches for each trained step, none before step 4
    assert [(e.step, e.epoch) for e in steps] == [(4, 2), (5, 3), (6, 3)] and result.global_step == 6


def test_the_forms_preview_says_where_the_run_starts_and_ends(assets, tmp_path):
    from cockpit.panels import preview_text

    plan = plan_run(make_config(assets, tmp_path, max_train_epochs=4, initial_epoch=3))
    assert "starts at step 0 in epoch 3, ends at step 8" in preview_text(plan).plain
    plan = plan_run(make_config(assets, tmp_path, initial_step=5, skip_until_initial_step=True))
    assert "starts after step 5 in epoch 2, ends at step 10" in preview_text(plan).plain
    assert "starts" not in preview_text(plan_run(make_config(assets, tmp_path))).plain
