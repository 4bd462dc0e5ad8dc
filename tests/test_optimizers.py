"""kohya's optimizer names, --optimizer_args parsing and each optimizer's first update."""

from __future__ import annotations

import inspect

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.optimizers import (
    KNOWN_OPTIMIZERS,
    TORCH_OPTIMIZERS,
    build_optimizer,
    eval_weights,
    mps_replacement,
    parse_key_values,
)


# --------------------------------------------------------------------------- --optimizer_args
def test_optimizer_args_values_are_python_literals_as_kohya_reads_them():
    got = parse_key_values(["weight_decay=0.1", "betas=0.9,0.99", "decouple=True", "use_bias_correction=False",
                            "d0=1e-5", "eps=1e-8", "name='x'", "n=3"], "--optimizer_args")
    assert got == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "use_bias_correction": False,
                   "d0": 1e-5, "eps": 1e-8, "name": "x", "n": 3}
    assert type(got["n"]) is int and type(got["decouple"]) is bool


@pytest.mark.parametrize("bad", ["weight_decay", "weight_decay=", "decouple=true", "a=b=c", "=1", "betas=(0.9,"])
def test_bad_optimizer_args_are_one_line_naming_the_flag(bad):
    with pytest.raises(ConfigError) as err:
        parse_key_values([bad], "--optimizer_args")
    message = str(err.value)
    assert message.startswith("--optimizer_args:") and repr(bad) in message and "\n" not in message


# --------------------------------------------------------------------------- names
def test_torch_optimizer_names_match_torch_optim():
    actual = {n for n, c in vars(torch.optim).items()
              if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    assert set(TORCH_OPTIMIZERS) == actual


def test_unknown_optimizer_is_one_line_listing_the_known_ones():
    problems = TrainConfig(optimizer_type="AdamW9bit").problems()
    assert "AdamW9bit" in problems["optimizer_type"]
    assert all(name in problems["optimizer_type"] for name in KNOWN_OPTIMIZERS)
    with pytest.raises(ConfigError, match="^--optimizer_type ") as err:
        TrainConfig(optimizer_type="AdamW9bit", pretrained_model_name_or_path="m", train_data_dir="d").validate()
    assert "\n" not in str(err.value)


def test_kohya_names_are_case_insensitive_and_dotted_paths_are_accepted():
    assert "optimizer_type" not in TrainConfig(optimizer_type="prodigy").problems()
    assert "optimizer_type" not in TrainConfig(optimizer_type="torch.optim.RMSprop").problems()
    assert "optimizer_type" not in TrainConfig(optimizer_type="RMSprop").problems()


def test_use_8bit_adam_is_adamw8bit_and_conflicts_are_refused():
    import bitsandbytes as bnb

    built = build_optimizer(TrainConfig(use_8bit_adam=True), _groups(), "cpu")
    assert type(built.optimizer) is bnb.optim.AdamW8bit
    problems = TrainConfig(use_8bit_adam=True, optimizer_type="Lion").problems()
    assert "--optimizer_type=Lion" in problems["use_8bit_adam"]


@pytest.mark.parametrize("name,instead", [("AdamW8bit", "AdamW"), ("PagedAdamW8bit", "AdamW"), ("Lion8bit", "Lion"),
                                          ("SGDNesterov8bit", "SGDNesterov"), ("PagedAdamW32bit", "AdamW")])
def test_bitsandbytes_optimizers_fall_back_on_mps(name, instead):
    assert mps_replacement(name, "mps") == instead
    assert mps_replacement(name, "cpu") is None and mps_replacement(name, "cuda") is None
    assert mps_replacement("Prodigy", "mps") is None


def test_mps_fallback_builds_the_replacement_with_one_warning(monkeypatch):
    built = build_optimizer(TrainConfig(optimizer_type="AdamW8bit"), _groups(), "mps")
    assert type(built.optimizer) is torch.optim.AdamW
    (warning,) = [m for level, m in built.messages if level == "warning"]
    assert "AdamW8bit" in warning and "MPS" in warning and "AdamW instead" in warning


def test_a_dotted_path_that_is_not_an_optimizer_is_refused():
    with pytest.raises(ConfigError, match="not a torch.optim.Optimizer subclass"):
        build_optimizer(TrainConfig(optimizer_type="torch.nn.Linear"), _groups(), "cpu")
    with pytest.raises(ConfigError, match="cannot import nosuchmodule"):
        build_optimizer(TrainConfig(optimizer_type="nosuchmodule.Opt"), _groups(), "cpu")


def test_an_argument_the_optimizer_does_not_take_is_one_line():
    with pytest.raises(ConfigError, match="^--optimizer_args: AdamW refused") as err:
        build_optimizer(TrainConfig(optimizer_args=["nosuch=1"]), _groups(), "cpu")
    assert "\n" not in str(err.value)


def test_prodigy_warns_on_a_low_lr_and_refuses_different_group_lrs():
    built = build_optimizer(TrainConfig(optimizer_type="Prodigy", learning_rate=1e-4), _groups(1e-4, 1e-4), "cpu")
    assert any("about 1.0" in m for level, m in built.messages if level == "warning")
    with pytest.raises(ConfigError, match="same learning rate"):
        build_optimizer(TrainConfig(optimizer_type="Prodigy", learning_rate=1.0), _groups(1.0, 0.5), "cpu")
    # DAdaptAdaGrad takes them (kohya warns that only the first sets the step size)
    built = build_optimizer(TrainConfig(optimizer_type="DAdaptAdaGrad", learning_rate=1.0), _groups(1.0, 0.5), "cpu")
    assert any("only the first" in m for _, m in built.messages)


def test_metadata_name_is_kohyas_module_class_with_args():
    assert build_optimizer(TrainConfig(), _groups(), "cpu").name == "torch.optim.adamw.AdamW"
    built = build_optimizer(TrainConfig(optimizer_type="AdamW", optimizer_args=["weight_decay=0.1", "betas=0.9,0.99"]),
                            _groups(), "cpu")
    assert built.name == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    assert build_optimizer(TrainConfig(optimizer_type="SGDNesterov"), _groups(), "cpu").name == \
        "torch.optim.sgd.SGD(momentum=0.9)"
    assert build_optimizer(TrainConfig(optimizer_type="Adafactor"), _groups(), "cpu").name == \
        "transformers.optimization.Adafactor(relative_step=True)"


# --------------------------------------------------------------------------- first update vs the library
def _groups(*lrs: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    lrs = lrs or (1e-3,)
    return [{"params": [torch.nn.Parameter(torch.randn(8, 64, generator=gen))], "lr": lr, "name": f"g{i}"}
            for i, lr in enumerate(lrs)]


def _by_hand(name: str):
    """What the library's own optimizer is, for kohya's name, given (params, lr, args)."""
    import bitsandbytes as bnb
    import dadaptation
    import dadaptation.experimental as dexp
    import lion_pytorch
    import prodigyopt
    import schedulefree
    from transformers.optimization import Adafactor

    table = {
        "AdamW": lambda p, lr, a: torch.optim.AdamW(p, lr=lr, **a),
        "AdamW8bit": lambda p, lr, a: bnb.optim.AdamW8bit(p, lr=lr, **a),
        "PagedAdamW8bit": lambda p, lr, a: bnb.optim.PagedAdamW8bit(p, lr=lr, **a),
        "PagedAdamW": lambda p, lr, a: bnb.optim.PagedAdamW(p, lr=lr, **a),
        "PagedAdamW32bit": lambda p, lr, a: bnb.optim.PagedAdamW32bit(p, lr=lr, **a),
        "Lion": lambda p, lr, a: lion_pytorch.Lion(p, lr=lr, **a),
        "Lion8bit": lambda p, lr, a: bnb.optim.Lion8bit(p, lr=lr, **a),
        "PagedLion8bit": lambda p, lr, a: bnb.optim.PagedLion8bit(p, lr=lr, **a),
        "SGDNesterov": lambda p, lr, a: torch.optim.SGD(p, lr=lr, nesterov=True, momentum=0.9, **a),
        "SGDNesterov8bit": lambda p, lr, a: bnb.optim.SGD8bit(p, lr=lr, nesterov=True, momentum=0.9, **a),
        "DAdaptation": lambda p, lr, a: dexp.DAdaptAdamPreprint(p, lr=lr, **a),
        "DAdaptAdamPreprint": lambda p, lr, a: dexp.DAdaptAdamPreprint(p, lr=lr, **a),
        "DAdaptAdaGrad": lambda p, lr, a: dadaptation.DAdaptAdaGrad(p, lr=lr, **a),
        "DAdaptAdam": lambda p, lr, a: dadaptation.DAdaptAdam(p, lr=lr, **a),
        "DAdaptAdan": lambda p, lr, a: dadaptation.DAdaptAdan(p, lr=lr, **a),
        "DAdaptAdanIP": lambda p, lr, a: dexp.DAdaptAdanIP(p, lr=lr, **a),
        "DAdaptLion": lambda p, lr, a: dadaptation.DAdaptLion(p, lr=lr, **a),
        "DAdaptSGD": lambda p, lr, a: dadaptation.DAdaptSGD(p, lr=lr, **a),
        "Prodigy": lambda p, lr, a: prodigyopt.Prodigy(p, lr=lr, **a),
        "Adafactor": lambda p, lr, a: Adafactor(p, lr=None, relative_step=True, **a),
        "AdamWScheduleFree": lambda p, lr, a: schedulefree.AdamWScheduleFree(p, lr=lr, **a),
        "RAdamScheduleFree": lambda p, lr, a: schedulefree.RAdamScheduleFree(p, lr=lr, **a),
        "SGDScheduleFree": lambda p, lr, a: schedulefree.SGDScheduleFree(p, lr=lr, **a),
    }
    return table[name]


ARGS = {"AdamW": ["weight_decay=0.1", "betas=0.9,0.99"], "Prodigy": ["d_coef=2.0", "decouple=True"],
        "Lion": ["weight_decay=0.01"], "DAdaptAdam": ["decouple=True"], "AdamWScheduleFree": ["warmup_steps=0"]}


@pytest.mark.parametrize("name", KNOWN_OPTIMIZERS)
def test_first_updates_equal_the_library_optimizer_stepped_by_hand(name):
    lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-3
    args = ARGS.get(name, [])
    ours = _groups(lr)
    theirs = [{**g, "params": [torch.nn.Parameter(g["params"][0].detach().clone())]} for g in ours]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(8, 64, generator=gen) for _ in range(6)]  # RAdam moves nothing in its first steps
    built = build_optimizer(TrainConfig(optimizer_type=name, learning_rate=lr, optimizer_args=args), ours, "cpu")
    reference = _by_hand(name)(theirs, lr, parse_key_values(args, "x"))
    if hasattr(reference, "train"):
        reference.train()
    for groups, opt in ((ours, built.optimizer), (theirs, reference)):
        for grad in grads:
            groups[0]["params"][0].grad = grad.clone()
            opt.step()
    start = _groups(lr)[0]["params"][0]
    assert not torch.equal(ours[0]["params"][0], start), "the update moved nothing"
    assert torch.equal(ours[0]["params"][0], theirs[0]["params"][0])
    assert built.schedule_free == name.endswith("ScheduleFree")


def test_schedule_free_eval_weights_inside_and_the_exact_train_weights_after():
    import schedulefree

    groups = _groups(1e-2)
    built = build_optimizer(TrainConfig(optimizer_type="AdamWScheduleFree", learning_rate=1e-2), groups, "cpu")
    p = groups[0]["params"][0]
    for seed in range(3):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
        built.optimizer.step()
    train_weights = p.detach().clone()
    probe = schedulefree.AdamWScheduleFree([torch.nn.Parameter(train_weights.clone())], lr=1e-2)
    probe.load_state_dict(built.optimizer.state_dict())
    probe.eval()
    with eval_weights(built.optimizer):
        assert torch.equal(p, probe.param_groups[0]["params"][0])
        assert not torch.equal(p, train_weights)
    assert torch.equal(p, train_weights) and built.optimizer.param_groups[0]["train_mode"]
