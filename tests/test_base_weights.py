"""kohya's ``--base_weights`` / ``--base_weights_multiplier``: LoRA and LyCORIS files merged into the tiny
base model before training (W += multiplier · ΔW, computed here by hand from the files' tensors), the flags
read from the command line, presets and kohya's --config_file, bad files refused in one line, and runs that
train over the merged model, save only their own network and resume exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ConfigError
from engine.events import LogMessage, StepCompleted
from tests.test_durable import assets, check_resume_equals_straight, make_config, read_tensors, train  # noqa: F401
from tests.test_lycoris import ALGOS

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV3 = "down_blocks.0.resnets.0.conv1"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"          # a 1x1 conv in the tiny (and SD1.5) UNet
TE_Q = "encoder.layers.0.self_attn.q_proj"


def kohya_name(module: str, part: str = "unet") -> str:
    return f"lora_unet_{module}".replace(".", "_") if part == "unet" else \
        f"lora_te_text_model_{module}".replace(".", "_")


# --------------------------------------------------------------------------- fixtures and files
@pytest.fixture(scope="module")
def base_models(assets):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = assets.root / "tiny-sd15"
    return UNet2DConditionModel.from_pretrained(root / "unet"), CLIPTextModel.from_pretrained(root / "text_encoder")


def fresh(base_models):
    unet, te = base_models
    return copy.deepcopy(unet), copy.deepcopy(te)


def weight(models, module: str, part: str = "unet") -> torch.Tensor:
    unet, te = models
    return (unet if part == "unet" else te).get_submodule(module).weight.detach().clone()


def lora_tensors(models, modules: dict[tuple[str, str], tuple[int, float]], seed: int) -> dict[str, torch.Tensor]:
    """kohya's networks.lora tensors for ``(module, part) -> (dim, alpha)``: a conv gets kohya's LoCon shapes
    (down: the layer's kernel, up: 1x1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (module, part), (dim, alpha) in modules.items():
        w = weight(models, module, part)
        name = kohya_name(module, part)
        kernel = tuple(w.shape[2:])
        out[f"{name}.lora_down.weight"] = torch.randn((dim, w.shape[1], *kernel), generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn((w.shape[0], dim, *(1,) * len(kernel)), generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def expected_delta(tensors: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """kohya's LoRA delta by hand: up @ down · alpha/dim (conv weights flattened to matrices)."""
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    alpha, dim = float(tensors[f"{name}.alpha"]), down.shape[0]
    return ((up.flatten(1) @ down.flatten(1)) * (alpha / dim)).reshape(shape)


FOUR = {(LINEAR, "unet"): (2, 1.0), (CONV3, "unet"): (4, 2.0), (PROJ_IN, "unet"): (2, 2.0), (TE_Q, "te"): (3, 1.5)}


@pytest.fixture(scope="module")
def lora_file(base_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base_weights") / "style.safetensors"
    save_file(lora_tensors(base_models, FOUR, seed=0), str(path))
    return path


def merge(models, paths, multipliers=()):
    from engine.base_weights import merge_base_weights

    return merge_base_weights([str(p) for p in paths], list(multipliers), *models)


# --------------------------------------------------------------------------- the merge
def test_merging_a_kohya_lora_adds_multiplier_times_alpha_over_dim_up_down_to_each_layer(base_models, lora_file):
    from safetensors.torch import load_file

    tensors = load_file(str(lora_file))
    models = fresh(base_models)
    before = {key: weight(models, *key) for key in FOUR}
    lines = merge(models, [lora_file], [0.5])
    assert lines[0] == f"merging module: {lora_file} with multiplier 0.5"
    assert lines[1] == f"{lora_file}: 4 modules merged (U-Net 3, text encoder 1)"
    assert lines[-1] == f"all weights merged: {lora_file}"
    for (module, part), w0 in before.items():
        delta = weight(models, module, part) - w0
        want = 0.5 * expected_delta(tensors, kohya_name(module, part), w0.shape)
        assert torch.allclose(delta, want, atol=1e-6, rtol=0), (module, float((delta - want).abs().max()))
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(weight(models, untouched), weight(base_models, untouched))


def test_a_file_without_a_multiplier_merges_at_one_and_two_files_add_up(base_models, lora_file, tmp_path):
    from safetensors.torch import load_file

    second = tmp_path / "second.safetensors"
    save_file(lora_tensors(base_models, {(LINEAR, "unet"): (4, 4.0)}, seed=1), str(second))
    models = fresh(base_models)
    w0 = weight(models, LINEAR)
    lines = merge(models, [lora_file, second], [0.25])
    assert [ln for ln in lines if ln.startswith("merging module:")] == [
        f"merging module: {lora_file} with multiplier 0.25", f"merging module: {second} with multiplier 1.0"]
    assert lines[-1] == f"all weights merged: {lora_file}, {second}"
    name = kohya_name(LINEAR)
    want = 0.25 * expected_delta(load_file(str(lora_file)), name, w0.shape) + \
        expected_delta(load_file(str(second)), name, w0.shape)
    assert torch.allclose(weight(models, LINEAR) - w0, want, atol=1e-6, rtol=0)


def test_a_kohya_module_saved_without_alpha_merges_at_alpha_equal_to_its_rank(base_models, tmp_path):
    tensors = lora_tensors(base_models, {(LINEAR, "unet"): (2, 2.0)}, seed=2)
    want = expected_delta(tensors, kohya_name(LINEAR), weight(base_models, LINEAR).shape)   # alpha 2 = dim 2
    del tensors[f"{kohya_name(LINEAR)}.alpha"]
    path = tmp_path / "no_alpha.safetensors"
    save_file(tensors, str(path))
    models = fresh(base_models)
    merge(models, [path])
    assert torch.allclose(weight(models, LINEAR) - weight(base_models, LINEAR), want, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def loha_file(base_models, tmp_path_factory) -> Path:
    """A LyCORIS LoHa file made by the project's lycoris.kohya network, its weights made non-trivial."""
    from engine.lycoris_net import apply_lycoris

    unet, te = fresh(base_models)
    net = apply_lycoris(unet, te, dim=4, alpha=2.0, network_args=["algo=loha", "preset=full", "conv_dim=4"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("loha") / "loha.safetensors"
    save_file(net.state_dict_kohya(), str(path))
    return path


def test_a_lycoris_loha_file_merges_its_hadamard_delta_and_multiplier_zero_changes_nothing(base_models, loha_file):
    from safetensors.torch import load_file

    t = load_file(str(loha_file))
    name = kohya_name(LINEAR)
    assert f"{name}.hada_w1_a" in t and f"{name}.lora_down.weight" not in t
    models = fresh(base_models)
    w0 = weight(models, LINEAR)
    lines = merge(models, [loha_file], [0.5])
    assert "text encoder" in lines[1] and not lines[1].startswith(f"{loha_file}: 0 ")
    hada = (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"])
    want = 0.5 * hada * float(t[f"{name}.alpha"]) / t[f"{name}.hada_w1_b"].shape[0]
    assert torch.allclose(weight(models, LINEAR) - w0, want, atol=1e-6, rtol=0)
    assert not torch.equal(weight(models, TE_Q, "te"), weight(base_models, TE_Q, "te"))

    unchanged = fresh(base_models)
    merge(unchanged, [loha_file], [0.0])
    for (a, b) in zip(unchanged, base_models):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _outputs(models):
    unet, te = models
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    tokens = torch.randint(0, te.config.vocab_size, (1, 77), generator=g)
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([500]), ctx).sample, te.eval()(tokens).last_hidden_state


# LyCORIS 4.1 cannot rebuild these from their files (IA3's rebuild takes fewer arguments than it is given;
# its DyLoRA saves 1x1 convs 2-D): one line naming the module.
NOT_REBUILT = {"ia3", "dylora"}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_each_lycoris_algo_file_merges_into_the_model_its_network_computes(algo, base_models, tmp_path):
    from engine.lycoris_net import apply_lycoris

    trained = fresh(base_models)
    net = apply_lycoris(*trained, dim=4, alpha=2.0, network_args=ALGOS[algo])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / f"{algo}.safetensors"
    save_file(net.state_dict_kohya(), str(path))
    merged = fresh(base_models)
    if algo in NOT_REBUILT:
        with pytest.raises(ConfigError, match=rf"^--base_weights: {path}: LyCORIS cannot rebuild lora_\w+ \("):
            merge(merged, [path])
        return
    merge(merged, [path])
    base_out, want, got = _outputs(base_models), _outputs(trained), _outputs(merged)
    for b, w, m in zip(base_out, want, got):
        if not torch.equal(w, b):
            assert float((w - b).abs().max()) > 1e-2
        assert torch.allclose(m, w, atol=1e-5, rtol=0), (algo, float((m - w).abs().max()))


# --------------------------------------------------------------------------- bad files: one line each
def test_a_file_of_another_layout_or_model_is_one_line_saying_it_is_not_an_sd1_kohya_lora(base_models, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 2)}, str(sdxl))
    peft = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32)}, str(peft))
    for path, why in ((sdxl, "matches no layer of this model"), (peft, "has no lora_unet_/lora_te_ modules")):
        with pytest.raises(ConfigError) as err:
            merge(fresh(base_models), [path])
        message = str(err.value)
        assert message.startswith(f"--base_weights: {path} {why}: it is not an SD1.x LoRA in kohya's layout")
        assert "\n" not in message


def test_nan_in_a_file_and_a_missing_file_are_one_line_naming_the_flag(base_models, tmp_path):
    bad = tmp_path / "nan.safetensors"
    tensors = lora_tensors(base_models, {(LINEAR, "unet"): (2, 1.0)}, seed=0)
    tensors[f"{kohya_name(LINEAR)}.lora_up.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad))
    with pytest.raises(ConfigError, match=r"^--base_weights: .*nan.safetensors: lora_unet_.*_to_q.lora_up.weight has "
                                          r"NaN or Inf values; merge another file$"):
        merge(fresh(base_models), [bad])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"^--base_weights: .*broken.safetensors is not a valid safetensors file"):
        merge(fresh(base_models), [broken])


def test_a_missing_file_is_refused_before_the_base_model_loads_and_extra_multipliers_are_a_plan_warning(
        assets, lora_file, tmp_path):
    from engine.plan import plan_run

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError) as err:
        make_config(assets, tmp_path / "out", base_weights=[str(lora_file), str(missing)])
    assert str(err.value) == (f"--base_weights {missing}: no such file; give LoRA files (.safetensors, .pt or "
                              ".ckpt) to merge into the base model")
    with pytest.raises(ConfigError, match=r"--base_weights .*: a folder, not a file; give LoRA files"):
        make_config(assets, tmp_path / "out", base_weights=[str(tmp_path)])
    plan = plan_run(make_config(assets, tmp_path / "out", base_weights=[str(lora_file)],
                                base_weights_multiplier=[0.5, 2.0]))
    assert ("--base_weights_multiplier: 2 values for 1 --base_weights file(s); the extra 2 merge nothing (kohya "
            "ignores them too)") in plan.warnings


# --------------------------------------------------------------------------- flags, presets, config files
def parse(argv, notes=None):
    from engine.cli_args import make_parser, parse_train_args

    return parse_train_args(make_parser("spyke-cockpit train", ""), argv, notes=[] if notes is None else notes)[1]


def test_command_line_takes_several_files_and_multipliers_and_refuses_a_word_as_a_number():
    cfg = parse(["--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "0.5"])
    assert (cfg.base_weights, cfg.base_weights_multiplier) == (["a.safetensors", "b.safetensors"], [0.5])
    assert parse([]).base_weights == [] and parse([]).base_weights_multiplier == []
    with pytest.raises(ConfigError) as err:
        parse(["--base_weights_multiplier", "0.5", "x"])
    assert str(err.value) == "--base_weights_multiplier: 'x' is not a number"


@pytest.mark.parametrize("text, files, multipliers", [
    ('base_weights = ["a.safetensors", "b.pt"]\nbase_weights_multiplier = [0.5, 1]', ["a.safetensors", "b.pt"],
     [0.5, 1.0]),
    ('base_weights = "a.safetensors"\nbase_weights_multiplier = 0.5', ["a.safetensors"], [0.5]),
    ('[network]\nbase_weights = ""\nbase_weights_multiplier = ""', [], []),
    ('base_weights = []\nbase_weights_multiplier = []', [], []),
])
def test_presets_and_kohya_config_files_read_lists_single_values_and_empty_as_unset(tmp_path, text, files,
                                                                                   multipliers):
    from engine.config_io import build_config

    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    for kohya_file in (False, True):
        cfg = build_config(path, kohya_file=kohya_file)
        assert (cfg.base_weights, cfg.base_weights_multiplier) == (files, multipliers)
    assert parse([f"--config_file={path}"]).base_weights == files


def test_a_non_number_multiplier_in_a_config_file_is_one_line(tmp_path):
    from engine.config_io import build_config

    path = tmp_path / "c.toml"
    path.write_text('base_weights_multiplier = [0.5, "strong"]', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        build_config(path, kohya_file=True)
    assert str(err.value) == f"{path}: base_weights_multiplier: 'strong' is not a number"


def test_output_config_export_and_preset_toml_write_the_lists_back(tmp_path):
    from engine.api import export_kohya
    from engine.config_io import build_config, to_toml
    from engine.kohya_config import read_toml

    target = tmp_path / "out.toml"
    with pytest.raises(SystemExit):
        parse([f"--config_file={target}", "--output_config", "--base_weights", "a b.safetensors", "c.safetensors",
               "--base_weights_multiplier", "0.5", "0.75"])
    assert read_toml(target) == {"base_weights": ["a b.safetensors", "c.safetensors"],
                                 "base_weights_multiplier": [0.5, 0.75]}
    command = export_kohya(str(target))
    assert "--base_weights 'a b.safetensors' c.safetensors" in command
    assert "--base_weights_multiplier 0.5 0.75" in command
    preset = tmp_path / "preset.toml"
    preset.write_text(to_toml(build_config(target, kohya_file=True), skip_defaults=True), encoding="utf-8")
    again = build_config(preset)
    assert (again.base_weights, again.base_weights_multiplier) == (["a b.safetensors", "c.safetensors"], [0.5, 0.75])


# --------------------------------------------------------------------------- runs
def test_a_run_over_merged_weights_trains_and_saves_only_its_own_network(assets, lora_file, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(assets, out, max_train_steps=2, save_every_n_steps=None, save_state=False,
                      base_weights=[str(lora_file)], base_weights_multiplier=[0.5])
    run = train(cfg)
    assert run.result.status == "completed", run.result.error
    messages = [e.message for e in run.events if isinstance(e, LogMessage)]
    assert f"merging module: {lora_file} with multiplier 0.5" in messages
    assert f"all weights merged: {lora_file}" in messages
    saved = read_tensors(run.result.final_path)
    conv = kohya_name(CONV3)                 # the merged file's LoCon module: networks.lora (no conv_dim) has none
    assert not any(k.startswith(conv) for k in saved)
    linear = f"{kohya_name(LINEAR)}.lora_down.weight"
    assert cfg.network_dim != 2 and saved[linear].shape[0] == cfg.network_dim    # the run's rank, not the file's
    assert len(saved) % 3 == 0 and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in saved)
    plain = train(cfg.replace(output_dir=str(tmp_path / "plain"), base_weights=[], base_weights_multiplier=[]))
    losses = [[e.loss for e in r.events if isinstance(e, StepCompleted)] for r in (run, plain)]
    assert len(losses[0]) == len(losses[1]) == 2 and losses[0][0] != losses[1][0]   # the same batch, another base


def test_resuming_a_run_with_base_weights_equals_the_straight_run(assets, lora_file, loha_file, tmp_path):
    check_resume_equals_straight(assets, tmp_path / "out", base_weights=[str(lora_file), str(loha_file)],
                                 base_weights_multiplier=[0.7])


def test_the_forms_text_of_the_lists_reads_back_as_the_same_values():
    from cockpit.form import _display
    from engine.config_io import coerce_value

    for name, value in (("base_weights", ["a b.safetensors", "c.pt"]), ("base_weights_multiplier", [0.5, 1.0])):
        assert coerce_value(name, _display(value), name) == value
