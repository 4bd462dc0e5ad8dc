"""``--network_module=lycoris.kohya``: the LyCORIS library's networks, trained, saved and reloaded as
kohya + LyCORIS do (keys, metadata, reload with LyCORIS's own loader, exact resume, pre-flight sizes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.config import TrainConfig
from engine.errors import ConfigError

# algo -> network_args over the tiny model (its text encoder's MLP width 37 has no BOFT factorisation,
# so BOFT takes the UNet's transformers only)
ALGOS = {
    "locon": ["algo=locon", "preset=full", "conv_dim=4", "conv_alpha=2"],
    "loha": ["algo=loha", "preset=full", "conv_dim=4"],
    "lokr": ["algo=lokr", "preset=full", "factor=4"],
    "ia3": ["algo=ia3", "preset=full", "train_on_input=True"],
    "dylora": ["algo=dylora", "preset=attn-mlp"],
    "diag-oft": ["algo=diag-oft", "preset=full", "conv_dim=4"],
    "boft": ["algo=boft", "preset=unet-transformer-only"],
    "glora": ["algo=glora", "preset=attn-mlp"],
    "full": ["algo=full", "preset=attn-mlp"],
    "dora": ["algo=locon", "preset=unet-transformer-only", "dora_wd=True"],
}
# LyCORIS 4.1.3's create_network_from_weights cannot rebuild IA3 (IA3Module.make_module_from_state_dict
# takes fewer arguments than it is given): its file reloads the way kohya's --network_weights does,
# create_network + load_weights. LyCORIS's DyLoRA saves 1x1-conv weights 2-D, which neither its loader nor
# its DyLoRA modules (whose load is a no-op) read back: its file reloads through the engine's loader.
FROM_WEIGHTS_BROKEN = {"ia3"}
ENGINE_RELOAD = {"dylora"}


# --------------------------------------------------------------------------- network_args (no torch)
def _validate(items, **extra):
    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", network_module="lycoris.kohya",
                       network_args=items, **extra).validate()


@pytest.mark.parametrize("items, message", [
    (["algo=lokra"], "--network_args algo='lokra' must be one of lora, locon, loha, lokr"),
    (["preset=fulll"], "--network_args preset='fulll' must be one of full, full-lin"),
    (["factor=0"], "--network_args factor='0' must be an integer ≥ 1, or -1"),
    (["conv_dim=8.5"], "--network_args conv_dim='8.5' must be an integer ≥ 0"),
    (["dora_wd=0"], "--network_args dora_wd='0' must be True or False"),
    (["rank_dropout=1"], "--network_args rank_dropout='1' must be a probability in [0, 1)"),
])
def test_bad_lycoris_network_args_are_one_line_naming_the_key(items, message):
    with pytest.raises(ConfigError) as err:
        _validate(items)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_lycoris_gets_kohyas_strings_plus_dropout_from_network_dropout():
    from engine.lycoris_args import lycoris_kwargs

    assert lycoris_kwargs(["algo=lokr", "factor=8", "dora_wd=True"], 0.1) == {
        "algo": "lokr", "factor": "8", "dora_wd": "True", "dropout": 0.1}
    assert lycoris_kwargs(["dropout=0.2"], 0.1) == {"dropout": "0.2"}
    _validate(["algo=lokr", "preset=full", "conv_dim=100000", "factor=6", "use_cp=True", "decompose_both=False"],
              network_dim=100000)


def test_algo_and_preset_lists_are_lycoris_own():
    from lycoris.config import PRESET
    from lycoris.wrapper import network_module_dict

    from engine.lycoris_args import ALGOS as KNOWN_ALGOS, PRESETS

    assert set(PRESETS) == set(PRESET)
    assert set(KNOWN_ALGOS) == set(network_module_dict) - {"tlora"}


# --------------------------------------------------------------------------- the network over the tiny model
@pytest.fixture(scope="module")
def tiny_models(tiny_cache):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tiny_cache / "tiny-sd15"
    return UNet2DConditionModel.from_pretrained(root / "unet"), CLIPTextModel.from_pretrained(root / "text_encoder")


def _fresh(tiny_models):
    unet, te = tiny_models
    return copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()


def _unet_out(unet):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx).sample


def _perturb(net) -> None:
    """Give every trainable tensor non-trivial values (fresh networks are an exact no-op)."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_saved_file_reloads_with_lycoris_and_changes_the_unet_as_in_training(algo, tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    import lycoris.kohya as lycoris_kohya

    from engine.lycoris_net import _kohya_text_encoder, _sd1_presets, apply_lycoris

    unet, te = _fresh(tiny_models)
    base = _unet_out(unet)
    net = apply_lycoris(unet, te, dim=4, alpha=2.0, network_args=ALGOS[algo])
    _perturb(net)
    trained = _unet_out(unet)
    assert not torch.allclose(trained, base)
    sd = net.state_dict_kohya(torch.float16)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    names = {k.split(".")[0] for k in sd}
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for n in names), names
    if "unet-" not in " ".join(ALGOS[algo]):        # the unet-* presets leave the text encoder alone
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    path = tmp_path / f"{algo}.safetensors"
    save_file(sd, str(path))

    unet2, te2 = _fresh(tiny_models)
    holder = _kohya_text_encoder(te2)
    if algo in ENGINE_RELOAD:
        from engine.network_weights import load_network_weights

        loaded = apply_lycoris(unet2, te2, dim=4, alpha=2.0, network_args=ALGOS[algo])
        assert "left out" not in load_network_weights(loaded, str(path))
        assert set(loaded.state_dict_kohya()) == set(sd)
    elif algo in FROM_WEIGHTS_BROKEN:
        from engine.lycoris_args import lycoris_kwargs

        with _sd1_presets():
            loaded = lycoris_kohya.create_network(1.0, 4, 2.0, None, holder, unet2,
                                                  **lycoris_kwargs(ALGOS[algo], None))
        loaded.apply_to(holder, unet2, True, True)
        info = loaded.load_weights(str(path))
        assert info == {}                                   # no missing, no unexpected keys
    else:
        loaded, weights = lycoris_kohya.create_network_from_weights(1.0, str(path), None, holder, unet2)
        loaded.apply_to(holder, unet2, True, True)
        info = loaded.load_state_dict(weights, strict=False)
        assert (info.missing_keys, info.unexpected_keys) == ([], [])
    if algo not in ENGINE_RELOAD:
        assert set(loaded.state_dict()) == set(sd)
    reloaded = _unet_out(unet2)
    fp16 = _unet_out_from_fp16(net, sd, unet)
    # the reloaded network computes with the file's fp16 tensors, the trainer's with fp32 copies of them
    assert torch.allclose(reloaded - base, fp16 - base, atol=2e-3), float((reloaded - fp16).abs().max())


def _unet_out_from_fp16(net, sd, unet):
    """The trainer's model with its weights rounded as the file stores them."""
    net.load_state_dict_kohya({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return _unet_out(unet)


def test_unet_only_text_encoder_only_and_lr_zero_pick_modules_and_groups(tiny_models):
    from engine.lycoris_net import apply_lycoris

    args = ["algo=locon", "preset=full"]
    unet, te = _fresh(tiny_models)
    only_unet = apply_lycoris(unet, te, dim=4, alpha=1, network_args=args, train_text_encoder=False)
    assert only_unet.text_encoder_module_names == [] and only_unet.unet_module_names
    assert not any(k.startswith("lora_te") for k in only_unet.state_dict_kohya())
    unet, te = _fresh(tiny_models)
    only_te = apply_lycoris(unet, te, dim=4, alpha=1, network_args=args, train_unet=False)
    assert only_te.unet_module_names == [] and len(only_te.text_encoder_module_names) == 30
    unet, te = _fresh(tiny_models)
    frozen_te = apply_lycoris(unet, te, dim=4, alpha=1, network_args=args, text_encoder_frozen=True)
    groups = frozen_te.param_groups(1e-4, 0.0)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4)]
    assert any(k.startswith("lora_te") for k in frozen_te.state_dict_kohya())      # saved, not trained
    assert not any(p.requires_grad for p in frozen_te.text_encoder_params)
    both = frozen_te.param_groups(1e-4, 5e-5)
    assert [(g["name"], g["lr"]) for g in both] == [("text_encoder", 5e-5), ("unet", 1e-4)]
    assert sum(len(g["params"]) for g in both) == len(list(frozen_te.net.parameters()))


def test_loraplus_ratio_gives_lycoris_plus_groups(tiny_models):
    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    net = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["algo=locon", "loraplus_lr_ratio=16"])
    names = [(g["name"], g["lr"]) for g in net.param_groups(1e-4, 1e-5)]
    assert names == [("text_encoder", 1e-5), ("text_encoder plus", 1.6e-4), ("unet", 1e-4), ("unet plus", 1.6e-3)]


def test_apply_max_norm_scales_down_to_the_norm_with_lycoris_regularization(tiny_models):
    import torch

    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    net = apply_lycoris(unet, te, dim=4, alpha=4, network_args=["algo=locon", "preset=attn-mlp"])
    _perturb(net)
    before = _unet_out(unet)
    scaled, mean, top = net.apply_max_norm(0.01, "cpu")
    assert scaled == net.module_count() and mean == pytest.approx(0.01) and top == pytest.approx(0.01)
    assert not torch.allclose(_unet_out(unet), before)       # the updates were scaled down in place
    again, _, top_after = net.apply_max_norm(0.02, "cpu")
    assert again == 0 and top_after == 0       # kohya/LyCORIS report (0, 0, 0) when no key needed scaling


def test_dropouts_stop_when_the_model_is_in_eval_mode(tiny_models):
    import torch

    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    net = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["algo=locon", "module_dropout=0.5",
                                                                 "rank_dropout=0.5"], dropout=0.5)
    _perturb(net)
    unet.train()
    torch.manual_seed(0)
    first = _unet_out(unet)
    assert all(m.training for m in net.net.unet_loras)
    unet.eval()
    assert torch.equal(_unet_out(unet), _unet_out(unet))
    assert not any(m.training for m in net.net.unet_loras)
    assert not torch.allclose(first, _unet_out(unet))


def test_network_weights_start_from_a_lycoris_file_and_a_wrong_rank_is_one_line(tiny_models, tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.lycoris_net import apply_lycoris
    from engine.network_weights import load_network_weights

    unet, te = _fresh(tiny_models)
    src = apply_lycoris(unet, te, dim=4, alpha=1, network_args=ALGOS["lokr"])
    _perturb(src)
    path = tmp_path / "start.safetensors"
    save_file(src.state_dict_kohya(), str(path))
    unet, te = _fresh(tiny_models)
    dst = apply_lycoris(unet, te, dim=4, alpha=1, network_args=ALGOS["lokr"])
    line = load_network_weights(dst, str(path))
    assert line.startswith(f"load network weights from {path}: ") and "left out" not in line
    got, want = dst.state_dict_kohya(), src.state_dict_kohya()
    assert all(torch.equal(got[k], want[k]) for k in want)
    unet, te = _fresh(tiny_models)
    other = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["algo=lokr", "preset=full", "factor=2"])
    with pytest.raises(ConfigError, match=r"^--network_weights: .* has shape .* but this network expects"):
        load_network_weights(other, str(path))


def test_resume_refuses_a_state_of_another_alpha(tiny_models):
    from engine.errors import CheckpointError
    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    a = apply_lycoris(unet, te, dim=4, alpha=1, network_args=ALGOS["loha"])
    unet, te = _fresh(tiny_models)
    b = apply_lycoris(unet, te, dim=4, alpha=2, network_args=ALGOS["loha"])
    with pytest.raises(CheckpointError, match=r"\.alpha is \[1\.0\] but this network has \[2\.0\]"):
        b.load_state_dict_kohya(a.state_dict_kohya(), source="s")
    with pytest.raises(CheckpointError, match=r"\.alpha is \[1\.0\] but this network has \[2\.0\]"):
        b.load_state_tensors(a.state_tensors(), source="s")


def test_a_full_network_state_copies_back_bit_exact_and_a_lycoris_keyed_state_still_loads(tiny_models):
    """algo=full's file holds diff = weight - original, which a reload adds back to the original: not the same
    float when the weight is much nearer 0 than the original. The run state keeps the weights themselves; a
    state folder holding LyCORIS's keys still resumes (approximately)."""
    import torch

    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    trained = apply_lycoris(unet, te, dim=4, alpha=2, network_args=ALGOS["full"])
    with torch.no_grad():     # weights far nearer 0 than the original: weight - original drops their low bits
        for p in trained.net.parameters():
            p.mul_(1e-3)
    weights = {k: v.detach().clone() for k, v in trained.net.named_parameters()}
    unet, te = _fresh(tiny_models)
    again = apply_lycoris(unet, te, dim=4, alpha=2, network_args=ALGOS["full"])
    again.load_state_tensors(trained.state_tensors(), source="s")
    assert all(torch.equal(p, weights[k]) for k, p in again.net.named_parameters())
    unet, te = _fresh(tiny_models)
    old = apply_lycoris(unet, te, dim=4, alpha=2, network_args=ALGOS["full"])
    old.load_state_tensors(trained.state_dict_kohya(), source="s")
    got = dict(old.net.named_parameters())
    assert max(float((got[k] - w).abs().max()) for k, w in weights.items()) < 1e-6
    assert not all(torch.equal(got[k], w) for k, w in weights.items())     # LyCORIS's own reload is not exact


# --------------------------------------------------------------------------- pre-flight sizes
def test_preflight_counts_lycoris_parameters_as_lycoris_builds_them(tiny_models, tiny_cache):
    from engine.fit.lycoris_size import lycoris_param_count
    from engine.lycoris_net import apply_lycoris

    root = tiny_cache / "tiny-sd15"
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    te_cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    for args, dim in ((ALGOS["locon"], 4), (ALGOS["loha"], 8), (ALGOS["lokr"], 8), (ALGOS["ia3"], 4),
                      (["algo=lokr", "preset=full", "conv_dim=100000", "factor=6"], 100000)):
        unet, te = _fresh(tiny_models)
        net = apply_lycoris(unet, te, dim=dim, alpha=1, network_args=args)
        real = sum(p.numel() for p in net.net.parameters())
        assert lycoris_param_count(args, dim, 1, unet_cfg, te_cfg) == (net.module_count(), real), args


def test_full_rank_lokr_preset_is_not_estimated_as_a_rank_100000_lora(tiny_cache, tmp_path):
    from engine.disk_budget import lora_size
    from engine.fit.preflight import estimate_memory

    values = dict(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"), train_data_dir="d",
                  network_dim=100000, network_alpha=1)
    lycoris = TrainConfig(network_module="lycoris.kohya", network_args=["algo=lokr", "preset=full",
                                                                         "conv_dim=100000", "factor=6"], **values)
    lora = TrainConfig(**values)
    assert estimate_memory(lycoris).parts["lora"] * 1000 < estimate_memory(lora).parts["lora"]
    assert lora_size(lycoris).params < 100_000


# --------------------------------------------------------------------------- training runs
N_STEPS, ABORT_AT = 4, 2


def _config(tiny_cache, out: Path, algo: str, **extra):
    from engine.demo import prepare_demo

    values = dict(resolution="64", max_train_steps=N_STEPS, max_train_epochs=None, save_every_n_steps=2,
                  save_state=True, seed=7, output_dir=str(out), network_module="lycoris.kohya", network_dim=4,
                  network_alpha=2, network_args=ALGOS[algo], learning_rate=1e-3, save_precision="fp16")
    values.update(extra)
    return prepare_demo(tiny_cache, out.parent, **values).validate()


def _train(cfg, abort_at=None):
    from engine.control import TrainingControl
    from engine.events import StepCompleted
    from engine.trainer import Trainer

    control = TrainingControl()

    def sink(event):
        if abort_at is not None and isinstance(event, StepCompleted) and event.step == abort_at:
            control.abort(save=True)

    return Trainer(cfg, control=control, sinks=[sink]).run()


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_abort_then_resume_equals_the_straight_run_and_files_are_lycoris(algo, tiny_cache, tmp_path):
    import torch
    from safetensors import safe_open

    straight = _train(_config(tiny_cache, tmp_path / "straight" / "out", algo))
    assert straight.status == "completed", straight.error
    out = tmp_path / "aborted" / "out"
    aborted = _train(_config(tiny_cache, out, algo), abort_at=ABORT_AT)
    assert aborted.status == "aborted", aborted.error
    state = next(out.glob(f"*-step{ABORT_AT:08d}-state"))
    resumed = _train(_config(tiny_cache, out, algo, resume=str(state)))
    assert resumed.status == "completed", resumed.error
    with safe_open(straight.final_path, "pt") as a, safe_open(resumed.final_path, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        meta = a.metadata()
        assert {a.get_tensor(k).dtype for k in a.keys()} == {torch.float16}
        assert any(".lora_up.weight" in k or ".hada_w1_a" in k or ".lokr_w1" in k for k in a.keys())
        assert any(not torch.all(a.get_tensor(k) == 0) for k in a.keys() if "lora_up" in k or "w1" in k)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {**dict(s.split("=") for s in ALGOS[algo]), "dropout": None}


def test_keys_lycoris_takes_but_does_not_act_on_are_named_in_the_log(tiny_models):
    from engine.lycoris_net import apply_lycoris

    unet, te = _fresh(tiny_models)
    net = apply_lycoris(unet, te, dim=4, alpha=1, network_args=["algo=lokr", "rank_dropout_scale=True",
                                                                 "decompose_both=False"])
    assert len(net.notes) == 2
    assert net.notes[0].startswith("--network_args: rank_dropout_scale= is not read by LyCORIS 4.1.3's create_network")
    assert net.notes[1].startswith("--network_args: decompose_both=False reaches LyCORIS as the text 'False', "
                                   "which it reads as true")


def test_full_rank_lokr_saved_at_fp16_keeps_its_alpha_finite_and_reloads(tiny_models, tmp_path):
    """The GUI's full LoKr presets (network_dim = conv_dim = 100000, save_precision fp16): LyCORIS's alpha
    is then 100000, past fp16's range; the file keeps it in float32 and the weights in fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.lycoris_net import apply_lycoris

    args = ["algo=lokr", "preset=full", "conv_dim=100000", "conv_alpha=1", "factor=6"]
    unet, te = _fresh(tiny_models)
    net = apply_lycoris(unet, te, dim=100000, alpha=1, network_args=args)
    _perturb(net)
    sd = net.state_dict_kohya(torch.float16)
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas and all(v.dtype == torch.float32 and float(v) == 100000 for v in alphas.values())
    weights = [v for k, v in sd.items() if not k.endswith(".alpha")]
    assert weights and all(v.dtype == torch.float16 and bool(torch.isfinite(v).all()) for v in weights)
    path = tmp_path / "full-lokr.safetensors"
    save_file(sd, str(path))
    unet, te = _fresh(tiny_models)
    again = apply_lycoris(unet, te, dim=100000, alpha=1, network_args=args)
    again.load_state_dict_kohya(load_file(str(path)), source=str(path))
    assert all(torch.equal(again.state_dict_kohya(torch.float16)[k], sd[k]) for k in sd)
