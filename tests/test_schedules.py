"""LR schedules with kohya's get_scheduler_fix semantics, and their flags in CLI, TOML and config."""

from __future__ import annotations

import math

import pytest
import torch

from engine.cli_args import make_parser, parse_train_args
from engine.config import TrainConfig
from engine.config_io import build_config, coerce_value, to_toml
from engine.errors import ConfigError
from engine.optimizers import build_optimizer
from engine.schedules import build_scheduler, steps_from


def _curve(cfg: TrainConfig, total: int, lr: float = 1.0) -> list[float]:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr}]
    built = build_optimizer(cfg, groups, "cpu")
    sched, _ = build_scheduler(cfg, built, total)
    out = []
    for _ in range(total):
        out.append(built.optimizer.param_groups[0]["lr"])
        groups[0]["params"][0].grad = torch.ones(2)
        built.optimizer.step()
        sched.step()
    return out


def test_ratio_warmup_is_that_share_of_the_total_steps():
    assert steps_from(0.1, 100) == 10 and steps_from(10, 100) == 10 and steps_from(0.05, 30) == 1
    lrs = _curve(TrainConfig(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.1, learning_rate=1.0), 100)
    assert lrs[:11] == pytest.approx([i / 10 for i in range(10)] + [1.0])
    assert all(x == 1.0 for x in lrs[10:])


def test_ratio_warmup_then_cosine():
    lrs = _curve(TrainConfig(lr_scheduler="cosine", lr_warmup_steps=0.2, learning_rate=1.0), 50)
    assert lrs[:10] == pytest.approx([i / 10 for i in range(10)])
    assert lrs[10:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 10) / 40)) for s in range(10, 50)])


def test_lr_scheduler_type_is_a_torch_scheduler_with_its_args():
    cfg = TrainConfig(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=10", "eta_min=0e-0"],
                      learning_rate=1.0)
    lrs = _curve(cfg, 10)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    dotted = _curve(cfg.replace(lr_scheduler_type="torch.optim.lr_scheduler.StepLR",
                                lr_scheduler_args=["step_size=3", "gamma=0.5"]), 7)
    assert dotted == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_lr_scheduler_type_refuses_a_warmup_and_unknown_classes():
    with pytest.raises(ConfigError, match="^--lr_warmup_steps: .*takes no warm-up"):
        _curve(TrainConfig(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=10"],
                           lr_warmup_steps=2), 4)
    with pytest.raises(ConfigError, match="^--lr_scheduler_type=NoSuchLR: no such scheduler class"):
        _curve(TrainConfig(lr_scheduler_type="NoSuchLR"), 4)
    with pytest.raises(ConfigError, match="^--lr_scheduler_args: CosineAnnealingLR refused"):
        _curve(TrainConfig(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_maxx=3"]), 4)


def test_relative_step_adafactor_uses_the_adafactor_schedule():
    from transformers.optimization import Adafactor, AdafactorSchedule

    groups = [{"params": [torch.nn.Parameter(torch.ones(4, 4))], "lr": 1e-4}]
    cfg = TrainConfig(optimizer_type="Adafactor", learning_rate=1e-4, lr_scheduler="cosine")
    built = build_optimizer(cfg, groups, "cpu")
    sched, _ = build_scheduler(cfg, built, 10)
    assert isinstance(sched, AdafactorSchedule) and built.adafactor_initial_lr == 1e-4
    assert built.optimizer.param_groups[0]["lr"] == 1e-4            # the initial LR, before any step
    p = groups[0]["params"][0]
    for _ in range(3):
        p.grad = torch.full((4, 4), 0.5)
        built.optimizer.step()
        sched.step()
    opt = built.optimizer
    assert isinstance(opt, Adafactor)
    assert opt.param_groups[0]["lr"] == pytest.approx(Adafactor._get_lr(opt.param_groups[0], opt.state[p]))
    with pytest.raises(ConfigError, match="adafactor scheduler takes no warm-up"):
        build_scheduler(cfg.replace(lr_warmup_steps=5), build_optimizer(cfg, [{"params": [p]}], "cpu"), 10)


def test_adafactor_scheduler_without_relative_step_adafactor_is_refused():
    with pytest.raises(ConfigError, match="^--lr_scheduler=adafactor needs --optimizer_type=Adafactor"):
        _curve(TrainConfig(lr_scheduler="adafactor"), 3)


def test_constant_schedule_with_a_warmup_is_refused_as_kohya_does():
    with pytest.raises(ConfigError, match="^--lr_warmup_steps: --lr_scheduler=constant takes no warm-up"):
        _curve(TrainConfig(lr_scheduler="constant", lr_warmup_steps=3), 10)


def test_min_lr_ratio_and_decay_steps():
    lrs = _curve(TrainConfig(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1), 20)
    assert lrs[0] == 1.0 and min(lrs) >= 0.1 - 1e-9 and lrs[-1] < 0.12
    wsd = _curve(TrainConfig(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.2, lr_decay_steps=0.3,
                             lr_scheduler_min_lr_ratio=0.0), 10)
    # 2 warm-up steps, 5 stable, 3 decaying along a half cosine
    assert wsd == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.25])
    with pytest.raises(ConfigError, match="needs --lr_scheduler_min_lr_ratio"):
        _curve(TrainConfig(lr_scheduler="cosine_with_min_lr"), 5)


def test_schedule_free_keeps_the_lr_constant_and_says_what_it_ignores():
    cfg = TrainConfig(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine", learning_rate=1e-3)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    built = build_optimizer(cfg, groups, "cpu")
    _, notes = build_scheduler(cfg, built, 10)
    assert [level for level, _ in notes] == ["warning"] and "--lr_scheduler ignored" in notes[0][1]
    assert _curve(cfg, 10, lr=1e-3) == [1e-3] * 10


# --------------------------------------------------------------------------- the flags
def test_warmup_steps_are_steps_when_whole_and_a_ratio_below_one():
    assert coerce_value("lr_warmup_steps", "0.1", "--lr_warmup_steps") == 0.1
    ten = coerce_value("lr_warmup_steps", 10.0, "x.toml")
    assert ten == 10 and type(ten) is int
    assert coerce_value("lr_warmup_steps", "10", "--lr_warmup_steps") == 10
    with pytest.raises(ConfigError, match="whole number of steps, or a ratio below 1"):
        coerce_value("lr_warmup_steps", "10.5", "--lr_warmup_steps")
    assert "lr_warmup_steps = 10\n" in to_toml(TrainConfig(lr_warmup_steps=ten))


def test_key_value_lists_from_the_cli_several_values_after_the_flag(tmp_path):
    parser = make_parser("spyke-cockpit train", "t")
    _, cfg = parse_train_args(parser, ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",
                                       "--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args",
                                       "T_max=1000", "eta_min=0e-0", "--use_8bit_adam", "--lr_warmup_steps=0.05"])
    assert cfg.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert cfg.lr_scheduler_args == ["T_max=1000", "eta_min=0e-0"]
    assert cfg.lr_scheduler_type == "CosineAnnealingLR" and cfg.use_8bit_adam and cfg.lr_warmup_steps == 0.05
    _, cfg = parse_train_args(parser, ["--optimizer_args=decouple=True"])
    assert cfg.optimizer_args == ["decouple=True"]


def test_key_value_lists_from_toml_as_a_list_or_one_spaced_string(tmp_path):
    listed = tmp_path / "a.toml"
    listed.write_text('[optimizer]\noptimizer_args = [ "decouple=True", "weight_decay=0.01",]\nlr_scheduler_args = []\n')
    assert build_config(listed).optimizer_args == ["decouple=True", "weight_decay=0.01"]
    spaced = tmp_path / "b.toml"
    spaced.write_text('optimizer_args = "decouple=True weight_decay=0.01"\n')
    assert build_config(spaced).optimizer_args == ["decouple=True", "weight_decay=0.01"]
    bad = tmp_path / "c.toml"
    bad.write_text("optimizer_args = [0.1]\n")
    with pytest.raises(ConfigError, match="optimizer_args must be key=value strings"):
        build_config(bad)
    round_trip = tmp_path / "d.toml"
    round_trip.write_text(to_toml(build_config(listed)))
    assert build_config(round_trip).optimizer_args == ["decouple=True", "weight_decay=0.01"]


def test_the_form_shows_a_key_value_list_as_spaced_text_that_reads_back_the_same():
    from cockpit.form import _display

    values = ["betas=0.9,0.99", 'name="a b"', "decouple=True"]
    text = _display(values)
    assert text == "betas=0.9,0.99 'name=\"a b\"' decouple=True"
    assert coerce_value("optimizer_args", text, "optimizer_args") == values
    assert _display(10) == "10" and _display(0.1) == "0.1"   # lr_warmup_steps: steps print as an int


def test_a_whole_float_warmup_in_a_kohya_config_file_is_steps_with_one_line_saying_how_kohya_differs(tmp_path):
    cfg_file = tmp_path / "k.toml"
    cfg_file.write_text("[optimizer]\nlr_warmup_steps = 100.0\nlr_decay_steps = 0.25\n")
    notes: list[str] = []
    cfg = parse_train_args(make_parser("spyke-cockpit train", "test"), [f"--config_file={cfg_file}"], notes=notes)[1]
    assert (cfg.lr_warmup_steps, cfg.lr_decay_steps) == (100, 0.25)
    assert notes == [f"{cfg_file} [optimizer]: lr_warmup_steps = 100.0: read as 100 steps; kohya would take this "
                     "float as a ratio of the total steps (100 x the run's length); write 100 to mean steps"]
    preset = tmp_path / "p.toml"
    preset.write_text("lr_warmup_steps = 100.0\n")
    notes.clear()
    assert parse_train_args(make_parser("spyke-cockpit train", "test"), [str(preset)], notes=notes)[1].lr_warmup_steps \
        == 100 and notes == []
