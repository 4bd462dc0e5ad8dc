"""kohya's networks.dylora: the per-forward rank draw, its gradients and scaling, the plain-LoRA file it
saves (kohya's keys, loadable as networks.lora, sliceable to a lower rank), its network_args, and exact
resume of a DyLoRA run (the draws come from Python's random, which the run state keeps)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoint import read_lora_file
from engine.config import TrainConfig
from engine.dylora import DyLoraModule, apply_dylora
from engine.errors import ConfigError
from engine.events import LogMessage
from engine.lora import apply_lora
from engine.network_args import parse_network_args
from tests.test_durable import ABORT_AT, N_STEPS, assets, make_config, max_abs_diff, read_tensors, train  # noqa: F401
from engine.train.setup import param_groups
from tests.test_network_args import load, models_of, unet_out

DIM, ALPHA, UNIT = 4, 2.0, 2
DYLORA = dict(network_module="networks.dylora", network_dim=DIM, network_alpha=ALPHA, network_args=[f"unit={UNIT}"],
              scale_weight_norms=1.0)


def dylora_args(*items: str):
    return parse_network_args(list(items), "networks.dylora", dim=DIM, alpha=ALPHA)


# --------------------------------------------------------------------------- one module, by hand
def test_each_training_forward_trains_one_block_of_unit_ranks_scaled_as_kohya():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    module = DyLoraModule("lora_unet_x", "x", base, "unet", dim=8, alpha=4.0, unit=2)
    base.add_module("dylora", module)
    base.register_forward_hook(module.forward_hook)
    with torch.no_grad():
        for b in module.lora_B:
            b.copy_(torch.randn(b.shape))
    down, up = module.down.detach().clone(), module.up.detach().clone()
    x = torch.randn(3, 6)
    random.seed(5)
    drawn = []
    for _ in range(40):
        for p in module.parameters():
            p.grad = None
        expect_rank = random.getstate()
        out = base(x)
        random.setstate(expect_rank)
        rank = random.randint(0, 7)
        rank -= rank % 2                                  # kohya: randint(0, dim-1) rounded down to the unit
        assert module.rank == rank
        drawn.append(rank)
        # the full-rank LoRA times alpha/dim * sqrt(dim / (rank + unit))
        want = x @ base.weight.T + base.bias + (x @ down.T @ up.T) * 0.5 * math.sqrt(8 / (rank + 2))
        assert torch.allclose(out, want, atol=1e-6)
        out.sum().backward()
        with_grad = [i for i, a in enumerate(module.lora_A) if a.grad is not None]
        assert with_grad == [i for i, b in enumerate(module.lora_B) if b.grad is not None] == [rank, rank + 1]
    assert set(drawn) == {0, 2, 4, 6}
    module.eval()                                         # outside training: the plain LoRA, nothing drawn
    state = random.getstate()
    assert torch.allclose(base(x), x @ base.weight.T + base.bias + (x @ down.T @ up.T) * 0.5, atol=1e-6)
    assert random.getstate() == state


def test_a_gradient_checkpointing_recompute_keeps_the_forwards_draw(tiny_cache):
    unet, te = load(tiny_cache)
    net = apply_dylora(unet, te, dim=DIM, alpha=ALPHA, network_args=dylora_args(f"unit={UNIT}", f"conv_dim={DIM}"))
    with torch.no_grad():
        for m in net.modules:
            for p in m.up_params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(m.kohya_name))) * 0.1)
    unet.train()
    g = torch.Generator().manual_seed(1)
    latents, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        random.seed(3)
        unet(latents, torch.tensor([10, 700]), ehs).sample.pow(2).mean().backward()
        grads.append({id(p): p.grad.clone() for p in net.unet_params if p.grad is not None})
        for p in net.unet_params:
            p.grad = None
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_each_rank_is_its_own_parameter_and_loraplus_puts_the_up_ranks_in_the_plus_group(tiny_cache):
    unet, te = load(tiny_cache)
    net = apply_dylora(unet, te, dim=DIM, alpha=ALPHA, network_args=dylora_args("loraplus_unet_lr_ratio=4"))
    groups = {g["name"]: g for g in param_groups(models_of(net))}
    assert list(groups) == ["unet", "unet plus", "text_encoder"]      # kohya: the TE has no ratio here
    unet_mods = [m for m in net.modules if m.part == "unet"]
    assert [id(p) for p in groups["unet"]["params"]] == [id(p) for m in unet_mods for p in m.lora_A]
    assert [id(p) for p in groups["unet plus"]["params"]] == [id(p) for m in unet_mods for p in m.lora_B]
    assert groups["unet plus"]["lr"] == pytest.approx(4e-3)
    assert len(groups["unet"]["params"]) == DIM * len(unet_mods)
    assert [id(p) for p in groups["text_encoder"]["params"]] == [
        id(p) for m in net.modules if m.part == "text_encoder" for p in list(m.lora_A) + list(m.lora_B)]


# --------------------------------------------------------------------------- the file layout
def test_dylora_file_is_kohyas_plain_lora_layout_and_behaves_as_that_lora_in_eval(tiny_cache):
    unet, te = load(tiny_cache)
    net = apply_dylora(unet, te, dim=DIM, alpha=ALPHA, network_args=dylora_args(f"unit={UNIT}", f"conv_dim={DIM}"))
    with torch.no_grad():
        for p in net.unet_params + net.text_encoder_params:
            p.copy_(torch.randn(p.shape) * 0.2)
    unet2, te2 = load(tiny_cache)
    lora = apply_lora(unet2, te2, dim=DIM, alpha=ALPHA,
                      network_args=parse_network_args([f"conv_dim={DIM}", f"conv_alpha={ALPHA}"]))
    assert net.expected_shapes() == lora.expected_shapes()      # kohya's names and shapes, 3x3 convs included
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") and s[2:] == (3, 3)
               for k, s in net.expected_shapes().items())
    sd = net.state_dict_kohya()
    lora.load_state_dict_kohya(sd)                              # strict: no key missing or left over
    assert torch.allclose(unet_out(unet.eval()), unet_out(unet2.eval()), atol=1e-5)
    assert not torch.allclose(unet_out(unet2), unet_out(load(tiny_cache)[0]), atol=1e-3)
    again = apply_dylora(*load(tiny_cache), dim=DIM, alpha=ALPHA,
                         network_args=dylora_args(f"unit={UNIT}", f"conv_dim={DIM}"))
    again.load_state_dict_kohya(sd)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict_kohya().values(), sd.values()))


# --------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):  # noqa: F811
    run = train(make_config(assets, tmp_path_factory.mktemp("dylora") / "out", **DYLORA))
    assert run.result.status == "completed", run.result.error
    return run


def test_a_dylora_run_saves_plain_lora_keys_and_its_first_ranks_work_alone(straight, tiny_cache):
    # kohya's DyLoRANetwork has no max-norm: the flag is ignored with a warning, as kohya does
    assert any(isinstance(e, LogMessage) and e.level == "warning" and "--scale_weight_norms" in e.message
               for e in straight.events)
    assert all(e.keys_scaled is None for e in straight.steps)
    assert any(isinstance(e, LogMessage) and e.message.startswith("DyLoRA: each module trains a random block of "
                                                                   f"{UNIT} of its {DIM} ranks") for e in straight.events)
    tensors, meta = read_lora_file(Path(straight.result.final_path))
    assert meta["ss_network_module"] == "networks.dylora" and meta["ss_network_dim"] == str(DIM)
    assert json.loads(meta["ss_network_args"]) == {"unit": str(UNIT)}
    assert meta["ss_scale_weight_norms"] == "False"

    unet, te = load(tiny_cache)
    lora = apply_lora(unet, te, dim=DIM, alpha=ALPHA)
    assert set(tensors) == set(lora.expected_shapes())           # the key set of kohya's networks.lora
    lora.load_state_dict_kohya(tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(bool(v.abs().sum() > 0) for v in ups)            # it trained (lora_up starts at zero)

    # DyLoRA's point: the first k·unit ranks are a LoRA of that rank (kohya's extract_lora_from_dylora slicing)
    rank = UNIT
    cut = {k: (v[:rank] if k.endswith("lora_down.weight") else v[:, :rank] if k.endswith("lora_up.weight") else v)
           for k, v in tensors.items()}
    small_unet, small_te = load(tiny_cache)
    small = apply_lora(small_unet, small_te, dim=rank, alpha=ALPHA)
    small.load_state_dict_kohya(cut)
    got = unet_out(small_unet)
    assert bool(torch.isfinite(got).all())
    assert not torch.equal(got, unet_out(load(tiny_cache)[0]))


def test_a_dylora_run_resumes_exactly(assets, straight, tmp_path):  # noqa: F811
    aborted = train(make_config(assets, tmp_path / "out", **DYLORA), abort_at=ABORT_AT)
    out = Path(aborted.result.final_path).parent
    resumed = train(make_config(assets, out, resume=str(out / f"spyke_demo-step{ABORT_AT:08d}-state"), **DYLORA))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight.steps}
    assert {e.step: e.loss for e in aborted.steps + resumed.steps} == ref and len(ref) == N_STEPS
    assert max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path)) <= 1e-6


# --------------------------------------------------------------------------- network_args
def test_dylora_network_args_are_kohyas_and_the_rest_are_refused_in_one_line():
    args = dylora_args("unit=2", "conv_dim=4", "conv_alpha=2", "loraplus_lr_ratio=8")
    assert (args.unit, args.conv_dim, args.conv_alpha, args.unet_ratio) == (2, 4, ALPHA, 8.0)
    assert dylora_args().unit == 1                                # kohya's default unit
    for items, message in (
        (["unit=3"], "--network_args: unit=3 must divide network_dim=4"),
        (["conv_dim=2"], "--network_args: conv_dim=2 must equal network_dim=4 for networks.dylora"),
        (["conv_dim=4", "conv_alpha=x"], "--network_args: conv_alpha='x' must be a number"),
        (["unit=two"], "--network_args: unit='two' must be an integer ≥ 1"),
    ):
        with pytest.raises(ConfigError) as err:
            dylora_args(*items)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    base = dict(pretrained_model_name_or_path="m", train_data_dir="d", network_module="networks.dylora")
    TrainConfig(**base, network_args=["unit=2"], network_dim=8).validate()
    assert dylora_args("conv_dim=4", "conv_alpha=1").conv_alpha == ALPHA     # kohya's conv modules: network_alpha
