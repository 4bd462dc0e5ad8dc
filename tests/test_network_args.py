"""kohya's networks.lora --network_args on the tiny model: LoCon convs, block dims, block LRs, LoRA+,
and kohya's three dropouts; the files reload and resume exactly."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoint import read_lora_file, save_lora_file
from engine.config import TrainConfig
from engine.config_io import build_config
from engine.errors import CheckpointError, ConfigError
from engine.lora import ADAPTER_NAME, apply_lora
from engine.network_args import parse_network_args
from engine.train.setup import param_groups
from tests.test_durable import ABORT_AT, N_STEPS, assets, make_config, max_abs_diff, read_tensors, train  # noqa: F401

DIM, ALPHA = 4, 2.0
CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def load(tiny_cache):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tiny_cache / "tiny-sd15"
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    te = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    return unet, te


def network(tiny_cache, args=(), **kwargs):
    unet, te = load(tiny_cache)
    net = apply_lora(unet, te, dim=DIM, alpha=ALPHA, network_args=parse_network_args(list(args)), **kwargs)
    return unet, te, net


def randomize(net, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.unet_params + net.text_encoder_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def unet_out(unet, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), ehs).sample


def kohya_conv_names(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya's rule, on the module tree: every Linear/Conv2d child of a ResnetBlock2D, Downsample2D or
    Upsample2D is ``lora_unet_`` + its path with ``_`` for ``.`` (kohya's UNet names the sampler conv
    ``conv``; diffusers also registers it as ``Conv2d_0``)."""
    out = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in CONV_PARENTS:
            for child_name, child in module._modules.items():
                if child_name != "Conv2d_0" and isinstance(child, (nn.Linear, nn.Conv2d)):
                    out["lora_unet_" + f"{name}.{child_name}".replace(".", "_")] = child
    return out


def is_3x3(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)


def kohya_block(name: str) -> int:
    """kohya's SD1.x block of a UNet LoRA name: IN01-IN11 = 1-11, MID = 12, OUT00-OUT11 = 13-24."""
    if m := re.search(r"(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_", name):
        idx = 3 * int(m[2]) + int(m[4])
    elif m := re.search(r"(down|up)_blocks_(\d+)_(down|up)samplers_\d+_", name):
        idx = 3 * int(m[2]) + 2
    else:
        assert "mid_block_" in name, name
        return 12
    return 1 + idx if m[1] == "down" else 13 + idx


def unet_ranks(net) -> dict[str, int]:
    return {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in net.state_dict_kohya().items()
            if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}


# --------------------------------------------------------------------------- conv_dim (LoCon)
def test_conv_dim_puts_lora_on_the_resnet_and_sampler_convs_under_kohya_names(tiny_cache, tmp_path):
    plain_unet, _, plain = network(tiny_cache)
    convs = kohya_conv_names(load(tiny_cache)[0])
    unet, _, net = network(tiny_cache, ["conv_dim=3", "conv_alpha=1.5"])
    assert any("downsamplers" in n for n in convs) and any("upsamplers" in n for n in convs)
    path = tmp_path / "locon.safetensors"
    save_lora_file(path, net.state_dict_kohya(), {})
    tensors, _ = read_lora_file(path)
    plain_keys = set(plain.state_dict_kohya())
    conv_keys = {f"{n}.{s}" for n in convs for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == plain_keys | conv_keys and not plain_keys & conv_keys
    for name, base in convs.items():
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        if is_3x3(base):                                                   # conv1, conv2, the samplers' conv
            assert tuple(down.shape) == (3, base.in_channels, 3, 3) and tuple(up.shape) == (base.out_channels, 3, 1, 1)
            assert float(alpha) == 1.5
        else:                                                              # time_emb_proj, conv_shortcut
            assert down.shape[0] == DIM and float(alpha) == ALPHA
    # the LoRA of a downsampler's conv runs in the forward (diffusers calls it through its `conv` alias)
    before = unet_out(unet)
    (down_lora,) = [m for m in net.modules if "downsamplers" in m.kohya_name]
    with torch.no_grad():
        down_lora.up.normal_()
    assert not torch.allclose(unet_out(unet), before)
    assert torch.equal(unet_out(plain_unet), before)   # up weights start at zero: same output as no LoRA


def test_locon_file_reloads_into_the_network_with_no_missing_or_unexpected_keys(tiny_cache, tmp_path):
    args = ["conv_dim=2", "conv_alpha=1", "block_dims=" + ",".join(["2"] * 12 + ["3"] + ["4"] * 12)]
    unet, _, net = network(tiny_cache, args)
    randomize(net)
    path = tmp_path / "locon.safetensors"
    save_lora_file(path, net.state_dict_kohya(), {})
    tensors, _ = read_lora_file(path)
    unet2, _, again = network(tiny_cache, args)
    again.load_state_dict_kohya(tensors, source=str(path))
    assert torch.equal(unet_out(unet2), unet_out(unet))
    _, _, plain = network(tiny_cache)
    with pytest.raises(CheckpointError, match=r"locon\.safetensors does not match this network: \d+ unexpected "
                                              r"key.*same base model, network_dim, network_args"):
        plain.load_state_dict_kohya(tensors, source=str(path))


# --------------------------------------------------------------------------- block dims
def test_block_dims_give_each_block_its_rank_and_alpha_and_zero_means_no_module(tiny_cache):
    dims = [(i % 4) for i in range(25)]                  # blocks 4, 8, 12, 16, 20, 24 get rank 0: no module
    alphas = [0.5 + i for i in range(25)]
    conv_dims = [(i % 3) + 1 for i in range(25)]
    args = ["block_dims=" + ",".join(map(str, dims)), "block_alphas=" + ",".join(map(str, alphas)),
            "conv_block_dims=" + ",".join(map(str, conv_dims))]
    convs = kohya_conv_names(load(tiny_cache)[0])
    unet, _, net = network(tiny_cache, args)
    ranks = unet_ranks(net)
    sd = net.state_dict_kohya()
    attention = {n for n in ranks if "_attentions_" in n}
    assert attention and {kohya_block(n) for n in ranks} - {0}
    for name, rank in ranks.items():
        block = kohya_block(name)
        if is_3x3(convs.get(name)):
            assert rank == conv_dims[block], name
            assert float(sd[f"{name}.alpha"]) == 1.0   # conv_block_alphas not given: kohya's 1.0
        else:
            assert rank == dims[block] and float(sd[f"{name}.alpha"]) == alphas[block], name
    _, _, full = network(tiny_cache, ["conv_dim=1"])
    dropped = {n for n in unet_ranks(full) if not is_3x3(convs.get(n))} - set(ranks)
    assert dropped and all(dims[kohya_block(n)] == 0 for n in dropped)
    te = [m for m in net.modules if m.part == "text_encoder"]
    assert te and all(m.down.shape[0] == DIM and m.alpha == ALPHA for m in te)


def models_of(net, unet_lr=1e-3, te_lr=5e-4):
    return types.SimpleNamespace(network=net, train_unet=True, train_te=True, unet_lr=unet_lr, te_lr=te_lr)


# --------------------------------------------------------------------------- block LR weights
def test_block_lr_weights_give_one_group_per_block_at_the_scaled_lr_and_drop_blocks_under_the_threshold(tiny_cache):
    down = [0.0, 0.5, 0.25, 1.0, 0.05, 1, 1, 1, 1, 1, 1, 2.0]
    args = ["down_lr_weight=" + ",".join(map(str, down)), "mid_lr_weight=0.75", "up_lr_weight=sine+0.1",
            "block_lr_zero_threshold=0.1"]
    _, _, net = network(tiny_cache, args)
    groups = param_groups(models_of(net))
    up = [(__import__("math").sin(__import__("math").pi * (i / 11) / 2) + 0.1) for i in range(12)]
    weights = [w if w > 0.1 else 0 for w in down] + [0.75] + up
    blocks = {kohya_block(m.kohya_name) for m in net.modules if m.part == "unet"}
    assert blocks and all(weights[b] > 0 for b in blocks)
    assert 5 not in blocks    # 0.05 ≤ threshold: the block has no LoRA at all (kohya), not just a frozen one
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {f"unet_block{b}" for b in blocks} | {"text_encoder"}
    for b in blocks:
        group = by_name[f"unet_block{b}"]
        assert group["lr"] == pytest.approx(1e-3 * weights[b])
        own = [p for m in net.modules if m.part == "unet" and kohya_block(m.kohya_name) == b for p in (m.down, m.up)]
        assert [id(p) for p in group["params"]] == [id(p) for p in own]
    assert by_name["text_encoder"]["lr"] == 5e-4


def test_lr_weight_presets_follow_kohyas_curves():
    args = parse_network_args(["down_lr_weight=cosine", "up_lr_weight=zeros+0.5", "mid_lr_weight=2"])
    import math

    assert args.block_lr_weight[:12] == pytest.approx([math.sin(math.pi * (i / 11) / 2) for i in reversed(range(12))])
    assert args.block_lr_weight[12:] == pytest.approx([2.0] + [0.5] * 12)
    assert parse_network_args(["down_lr_weight=1,2"]).block_lr_weight[:12] == (1.0, 2.0) + (1.0,) * 10


# --------------------------------------------------------------------------- LoRA+
def test_loraplus_puts_the_lora_up_weights_at_lr_times_the_ratio(tiny_cache):
    _, _, net = network(tiny_cache, ["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"])
    groups = {g["name"]: g for g in param_groups(models_of(net))}
    assert list(groups) == ["unet", "unet plus", "text_encoder", "text_encoder plus"]
    for part, lr, ratio in (("unet", 1e-3, 16), ("text_encoder", 5e-4, 4)):
        mods = [m for m in net.modules if m.part == part]
        assert groups[part]["lr"] == lr and groups[f"{part} plus"]["lr"] == pytest.approx(lr * ratio)
        assert [id(p) for p in groups[part]["params"]] == [id(m.down) for m in mods]
        assert [id(p) for p in groups[f"{part} plus"]["params"]] == [id(m.up) for m in mods]


# --------------------------------------------------------------------------- dropouts
@pytest.mark.parametrize("kwargs, args", [({"dropout": 0.5}, []), ({}, ["rank_dropout=0.5"]),
                                          ({}, ["module_dropout=0.5"])],
                         ids=["network_dropout", "rank_dropout", "module_dropout"])
def test_dropouts_change_only_the_training_forward_and_repeat_with_the_seed(tiny_cache, kwargs, args):
    plain_unet, _, plain = network(tiny_cache)
    unet, _, net = network(tiny_cache, args, **kwargs)
    randomize(plain)
    randomize(net)
    reference = unet_out(plain_unet)
    assert torch.equal(unet_out(unet), reference)      # eval: no dropout
    unet.train()
    torch.manual_seed(0)
    first = unet_out(unet)
    torch.manual_seed(0)
    assert torch.equal(unet_out(unet), first)
    torch.manual_seed(1)
    assert not torch.equal(unet_out(unet), first)
    assert not torch.allclose(first, reference)
    unet.eval()
    assert torch.equal(unet_out(unet), reference)


def test_network_and_rank_dropout_act_on_the_down_output_as_kohya(tiny_cache):
    _, _, net = network(tiny_cache, ["rank_dropout=0.25"], dropout=0.5)
    randomize(net)
    m = next(m for m in net.modules if m.part == "text_encoder")
    layer = m.layer
    layer.train()
    x = torch.randn(2, 5, m.down.shape[1])
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    with torch.no_grad():
        lx = torch.nn.functional.dropout(x @ m.down.T, p=0.5)   # kohya drops lora_down's output, not x
        mask = (torch.rand((2, m.down.shape[0])) > 0.25).unsqueeze(1)
        expected = layer.get_base_layer()(x) + (lx * mask) @ m.up.T * (ALPHA / DIM) / (1 - 0.25)
    assert torch.allclose(got, expected, atol=1e-6)
    assert isinstance(layer.lora_dropout[ADAPTER_NAME], nn.Identity)   # peft's input dropout stays off


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("items, message", [
    (["block_dims=1,2,3"], "--network_args block_dims must have 25 comma-separated values for SD1.x "
                           "(IN00-IN11, MID, OUT00-OUT11), got 3"),
    (["rank_dropout=1.5"], "--network_args rank_dropout='1.5' must be a probability in [0, 1)"),
    (["conv_dim"], "--network_args 'conv_dim' is not key=value"),
    (["down_lr_weight=cosin"], "--network_args down_lr_weight='cosin' must be 12 comma-separated weights or one of "
                               "cosine, sine, linear, reverse_linear, zeros"),
    (["conv_dim=8.5"], "--network_args conv_dim='8.5' must be an integer ≥ 0"),           # kohya: int() fails
    (["down_lr_weight=cosine", "block_lr_zero_threshold=x"], "--network_args block_lr_zero_threshold='x' must be"),
])
def test_bad_network_args_are_one_line_naming_the_key(items, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", network_args=items).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_network_args_and_network_dropout_are_flags_and_toml_keys(tmp_path):
    from engine.cli_args import make_parser, parse_train_args

    parser = make_parser("spyke-cockpit train", "test")
    _, cfg = parse_train_args(parser, ["--network_args", "conv_dim=4", "conv_alpha=1", "--network_dropout", "0.1"],
                              notes=[])
    assert (cfg.network_args, cfg.network_dropout) == (["conv_dim=4", "conv_alpha=1"], 0.1)
    toml = tmp_path / "c.toml"
    toml.write_text('network_args = ["conv_dim=8", "loraplus_lr_ratio=16"]\nnetwork_dropout = 0.3\n')
    cfg = build_config(toml)
    assert (cfg.network_args, cfg.network_dropout) == (["conv_dim=8", "loraplus_lr_ratio=16"], 0.3)
    with pytest.raises(ConfigError, match=r"^--network_dropout must be a probability in \[0, 1\)"):
        cfg.replace(network_dropout=1.0, pretrained_model_name_or_path="m", train_data_dir="d").validate()


# --------------------------------------------------------------------------- a run: exact resume, metadata
LOCON_RUN = dict(network_args=["conv_dim=2", "conv_alpha=1", "rank_dropout=0.2", "module_dropout=0.2"],
                 network_dropout=0.1)


def test_a_locon_run_with_dropouts_resumes_exactly(assets, tmp_path):  # noqa: F811
    straight = train(make_config(assets, tmp_path / "straight" / "out", **LOCON_RUN))
    assert straight.result.status == "completed", straight.result.error
    aborted = train(make_config(assets, tmp_path / "resumed" / "out", **LOCON_RUN), abort_at=ABORT_AT)
    out = Path(aborted.result.final_path).parent
    resumed = train(make_config(assets, out, resume=str(out / f"spyke_demo-step{ABORT_AT:08d}-state"), **LOCON_RUN))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight.steps}
    assert {e.step: e.loss for e in aborted.steps + resumed.steps} == ref and len(ref) == N_STEPS
    final = read_tensors(straight.result.final_path)
    assert any("_resnets_0_conv1." in k for k in final)
    assert max_abs_diff(final, read_tensors(resumed.result.final_path)) <= 1e-6
    _, meta = read_lora_file(Path(straight.result.final_path))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1", "rank_dropout": "0.2",
                                                   "module_dropout": "0.2"}
    assert meta["ss_network_dropout"] == "0.1"


# --------------------------------------------------------------------------- keys kohya ignores
LORA_KNOWN = ("conv_dim, conv_alpha, block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, "
              "mid_lr_weight, up_lr_weight, block_lr_zero_threshold, rank_dropout, module_dropout, loraplus_lr_ratio, "
              "loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio")
DYLORA_KNOWN = "unit, conv_dim, conv_alpha, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio"
IGNORED = {
    "lora": (dict(network_module="networks.lora", network_args=["conv_dim=4", "algo=lokr", "conv_dims=8", "unit=2"]), [
        "--network_args: algo= is a LyCORIS option (--network_module=lycoris.kohya reads it); kohya's networks.lora "
        "ignores it, and so does this run",
        f"--network_args: conv_dims= is not a key kohya's networks.lora reads (it reads {LORA_KNOWN}); kohya's "
        "networks.lora ignores it, and so does this run",
        "--network_args: unit= is a DyLoRA option (--network_module=networks.dylora reads it); kohya's networks.lora "
        "ignores it, and so does this run"]),
    "lora-orphans": (dict(network_module="networks.lora",
                          network_args=["conv_alpha=4", "block_alphas=" + ",".join(["1"] * 25),
                                        "block_lr_zero_threshold=0.1"]), [
        "--network_args: conv_alpha= is read only with conv_dim (the rank of the conv modules, e.g. conv_dim=4); "
        "kohya's networks.lora ignores it, and so does this run",
        "--network_args: block_alphas= is read only with block_dims or a down/mid/up_lr_weight; kohya's networks.lora "
        "ignores it, and so does this run",
        "--network_args: block_lr_zero_threshold= is read only with a down/mid/up_lr_weight; kohya's networks.lora "
        "ignores it, and so does this run"]),
    "dylora": (dict(network_module="networks.dylora", network_dim=4, network_alpha=2, network_dropout=0.1,
                    network_args=["unit=2", "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "dora_wd=True"]), [
        "--network_args: conv_alpha= is not used by networks.dylora: its conv modules take network_alpha=2; kohya's "
        "networks.dylora ignores it, and so does this run",
        f"--network_args: rank_dropout= is not a key kohya's networks.dylora reads (it reads {DYLORA_KNOWN}); kohya's "
        "networks.dylora ignores it, and so does this run",
        "--network_args: dora_wd= is a LyCORIS option (--network_module=lycoris.kohya reads it); kohya's "
        "networks.dylora ignores it, and so does this run",
        "--network_dropout=0.1 is not read by kohya's networks.dylora (DyLoRA has no dropout); kohya trains without "
        "it, and so does this run"]),
    "lycoris": (dict(network_module="lycoris.kohya", network_args=["algo=lokr", "algos=loha", "block_dims=2"]), [
        "--network_args: unknown key 'algos' for lycoris.kohya (it reads algo, preset, factor, conv_dim, block_size, "
        "conv_alpha, constraint, constrain, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, "
        "dropout, rank_dropout, module_dropout, use_tucker, use_cp, use_conv_cp, disable_conv_cp, use_scalar, "
        "train_norm, rescaled, dora_wd, wd_on_output, full_matrix, bypass_mode, rs_lora, unbalanced_factorization, "
        "decompose_both, rank_dropout_scale, train_on_input); LyCORIS ignores it, and so does this run",
        "--network_args: block_dims= is a networks.lora option that LyCORIS does not read; lycoris.kohya ignores it, "
        "and so does this run"]),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_network_args_kohya_ignores_train_with_one_warning_line_each(assets, tmp_path, case):  # noqa: F811
    from engine.plan import plan_run

    opts, expected = IGNORED[case]
    cfg = make_config(assets, tmp_path / "out", **opts)        # valid: kohya trains with these
    got = [w for w in plan_run(cfg).warnings if w.startswith(("--network_args", "--network_dropout"))]
    assert got == expected


def test_ignored_keys_change_nothing_in_the_network_kohya_builds(tiny_cache):
    from engine.lycoris_net import apply_lycoris

    known = ["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]
    assert parse_network_args(known + ["algo=lokr", "conv_dims=8", "unit=2", "block_alphas=1"]) == \
        parse_network_args(known)
    assert parse_network_args(["conv_alpha=4"]).conv_enabled is False
    assert parse_network_args(["conv_dim=4", "rank_dropout=0.3"], "networks.dylora", dim=4, alpha=2) == \
        parse_network_args(["conv_dim=4"], "networks.dylora", dim=4, alpha=2)
    unet, te = load(tiny_cache)
    plain = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["preset=attn-mlp"])
    unet, te = load(tiny_cache)
    typo = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["preset=attn-mlp", "algos=loha"])
    assert [m.lora_name for m in typo.net.unet_loras] == [m.lora_name for m in plain.net.unet_loras]
    assert {type(m).__name__ for m in typo.net.unet_loras} == {"LoConModule"}     # algo stayed LyCORIS's default
    assert sum(p.numel() for p in typo.net.parameters()) == sum(p.numel() for p in plain.net.parameters())


# --------------------------------------------------------------------------- network types not trained here
@pytest.mark.parametrize("module, items, message", [
    ("networks.lora_fa", [], "--network_module networks.lora_fa is not supported: kohya's LoRA-FA (lora_down frozen "
                             "at its random start) is not implemented here; use networks.lora, or lycoris.kohya"),
    ("networks.oft", [], "--network_module networks.oft is not supported: kohya's OFT is not implemented here; "
                         "LyCORIS's orthogonal fine-tuning is: --network_module=lycoris.kohya --network_args "
                         "algo=diag-oft (or algo=boft)"),
    ("networks.lora_flux", [], "--network_module networks.lora_flux is not supported: it trains FLUX.1 models; this "
                               "trainer trains SD1.x: use networks.lora (or lycoris.kohya)"),
    ("networks.lora_sd3", [], "--network_module networks.lora_sd3 is not supported: it trains SD3 models"),
    ("networks.control_net_lllite", [], "--network_module networks.control_net_lllite is not supported: "
                                        "ControlNet-LLLite is trained by kohya's sdxl_train_control_net_lllite.py"),
    ("networks.lorra", [], "--network_module must be one of networks.lora, networks.dylora, lycoris.kohya "
                           "(got 'networks.lorra')"),
    ("lycoris.kohya", ["algo=tlora"], "--network_args algo=tlora is not supported: LyCORIS's T-LoRA needs the "
                                      "training loop to set a rank mask for each step's timestep"),
])
def test_network_types_kohya_has_but_this_trainer_does_not_are_one_line_with_the_reason(module, items, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", network_module=module,
                    network_args=items).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# sd-scripts' networks/ folder: the modules train_network.py can be given (scripts such as merge_lora left out)
KOHYA_NETWORKS = ("lora", "dylora", "lora_fa", "oft", "lora_diffusers", "control_net_lllite",
                  "control_net_lllite_for_train", "lora_flux", "oft_flux", "lora_sd3", "lora_lumina",
                  "lora_hunyuan_image", "lora_anima")


def test_every_kohya_network_module_is_trained_or_refused_with_its_reason():
    from engine.network_args import UNSUPPORTED_MODULES

    trained = set(TrainConfig.__dataclass_fields__["network_module"].metadata["choices"])
    for name in KOHYA_NETWORKS:
        assert f"networks.{name}" in trained or f"networks.{name}" in UNSUPPORTED_MODULES, name
