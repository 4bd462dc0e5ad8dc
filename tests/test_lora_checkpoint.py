"""LoRA injection (peft, kohya layout) and kohya-format checkpoint files."""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoint import (
    cleanup_temp_files,
    read_lora_file,
    save_lora_file,
)
from engine.errors import CheckpointError, ConfigError
from engine.kohya.metadata import build_metadata
from engine.kohya.names import checkpoint_filename
from engine.lora import apply_lora

DIM = 4
ALPHA = 2.5


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_lora") / "model")


def _load_models(tiny_dir: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval()
    te = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder").eval()
    return unet, te


def _expected_names(unet: nn.Module, te: nn.Module) -> tuple[set[str], set[str]]:
    """kohya names derived from module enumeration (independent of engine.lora)."""
    unet_names = set()
    for name, m in unet.named_modules():
        if ".attentions." not in f".{name}":
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            unet_names.add("lora_unet_" + name.replace(".", "_"))
    te_names = set()
    for name, m in te.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}:
            name = name.removeprefix("text_model.")
            te_names.add("lora_te_text_model_" + name.replace(".", "_"))
    return unet_names, te_names


def _inputs(te: nn.Module):
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, te.config.vocab_size, (2, 77), generator=g)
    return latents, torch.tensor([10, 700]), ehs, ids


@torch.no_grad()
def _outputs(unet, te, inputs):
    latents, t, ehs, ids = inputs
    return unet(latents, t, ehs).sample, te(ids).last_hidden_state


def _randomize(net, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.unet_params + net.text_encoder_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


ALL_VALUES = {
    "session_id": 1234567890,
    "training_started_at": 1_700_000_000.25,
    "output_name": "spyke",
    "sd_model_name": "tiny.safetensors",
    "network_dim": DIM,
    "network_alpha": ALPHA,
    "learning_rate": 0.0001,
    "unet_lr": None,
    "text_encoder_lr": 5e-05,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 0,
    "optimizer": "torch.optim.adamw.AdamW",
    "max_grad_norm": 1.0,
    "num_train_images": 16,
    "num_reg_images": 0,
    "num_batches_per_epoch": 16,
    "num_epochs": 2,
    "max_train_steps": 32,
    "steps": 32,
    "epoch": 2,
    "gradient_checkpointing": False,
    "mixed_precision": "fp16",
    "clip_skip": 2,
    "seed": 42,
    "cache_latents": True,
    "prior_loss_weight": 1.0,
    "noise_offset": None,
    "min_snr_gamma": 5.0,
    "dataset_dirs": {"2_spyke": {"n_repeats": 2, "img_count": 8}},
    "tag_frequency": {"2_spyke": {"spyke": 8, "red": 3}},
    "new_sd_model_hash": "ab" * 32,
    "resolution": (128, 128),
    "training_finished_at": 1_700_000_100.5,
}


# ------------------------------------------------------------------------- lora layout
def test_kohya_key_set_shapes_and_alpha(tiny_dir):
    unet, te = _load_models(tiny_dir)
    exp_unet, exp_te = _expected_names(unet, te)
    net = apply_lora(unet, te, dim=DIM, alpha=ALPHA)

    # tiny model: 4 transformer blocks x (proj_in, proj_out, 8 attn, 2 ff); 5 CLIP layers x 6
    assert len(exp_unet) == 48 and len(exp_te) == 30
    assert net.module_count() == 78
    assert set(net.unet_module_names) == exp_unet and set(net.text_encoder_module_names) == exp_te
    sd = net.state_dict_kohya()
    expected_keys = {f"{n}.{s}" for n in exp_unet | exp_te for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(sd) == expected_keys

    for name in exp_unet | exp_te:
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        assert alpha.shape == () and alpha.item() == pytest.approx(ALPHA)
        assert down.device.type == "cpu" and down.is_contiguous()
        if "proj_in" in name or "proj_out" in name:
            assert down.dim() == 4 and up.dim() == 4
            assert down.shape[0] == DIM and down.shape[2:] == (1, 1)
            assert up.shape[1] == DIM and up.shape[2:] == (1, 1)
        else:
            assert down.dim() == 2 and down.shape[0] == DIM and up.shape[1] == DIM
        assert torch.count_nonzero(up) == 0  # lora_up starts at zero, like kohya
        assert torch.count_nonzero(down) > 0  # lora_down kaiming-uniform
    # shapes line up with the base layers
    conv = unet.down_blocks[0].attentions[0].proj_in.base_layer
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd[f"{key}.lora_down.weight"].shape == (DIM, conv.in_channels, 1, 1)
    assert sd[f"{key}.lora_up.weight"].shape == (conv.out_channels, DIM, 1, 1)
    fc1 = te.encoder.layers[0].mlp.fc1.base_layer if hasattr(te, "encoder") else te.text_model.encoder.layers[0].mlp.fc1.base_layer
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert sd[f"{key}.lora_down.weight"].shape == (DIM, fc1.in_features)
    assert sd[f"{key}.lora_up.weight"].shape == (fc1.out_features, DIM)

    # only LoRA params train; base weights frozen
    lora_ids = {id(p) for p in net.unet_params + net.text_encoder_params}
    assert len(net.unet_params) == 2 * 48 and len(net.text_encoder_params) == 2 * 30
    for model in (unet, te):
        for pname, p in model.named_parameters():
            assert p.requires_grad == (id(p) in lora_ids), pname
            assert (".lora_A." in pname or ".lora_B." in pname) == (id(p) in lora_ids), pname

    half = net.state_dict_kohya(torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())
    assert half[f"{key}.alpha"].item() == pytest.approx(ALPHA)


def test_unet_only_frozen_te_and_bad_values(tiny_dir):
    unet, te = _load_models(tiny_dir)
    net = apply_lora(unet, te, dim=2, alpha=1, train_text_encoder=False)
    assert net.text_encoder_params == [] and not net.text_encoder_module_names
    assert all(k.startswith("lora_unet_") for k in net.state_dict_kohya())
    assert not any("lora_" in n for n, _ in te.named_parameters())

    unet, te = _load_models(tiny_dir)
    net = apply_lora(unet, te, dim=2, alpha=1, text_encoder_frozen=True)
    assert len(net.text_encoder_params) == 60 and not any(p.requires_grad for p in net.text_encoder_params)
    assert all(p.requires_grad for p in net.unet_params)
    assert {id(p) for p in net.trainable_params()} == {id(p) for p in net.unet_params}
    assert any(k.startswith("lora_te_") for k in net.state_dict_kohya())

    for dim, alpha in ((0, 1), (-4, 1), (4, -1), (4, float("nan"))):
        unet, te = _load_models(tiny_dir)
        with pytest.raises(ConfigError, match="network_(dim|alpha)") as ei:
            apply_lora(unet, te, dim=dim, alpha=alpha)
        assert "\n" not in str(ei.value)
    # kohya: network_alpha 0 means alpha = dim (scale 1), and that is what it saves
    unet, te = _load_models(tiny_dir)
    net = apply_lora(unet, None, dim=8, alpha=0)
    assert net.alpha == 8.0 and next(v for k, v in net.state_dict_kohya().items() if k.endswith(".alpha")).item() == 8.0


def test_full_size_sd15_gets_kohyas_192_unet_and_72_text_encoder_modules():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models import DEFAULT_SD15_CONFIG_DIR as cfg

    with torch.device("meta"):                        # shapes only: nothing is allocated
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))
        net = apply_lora(unet, te, dim=32, alpha=16)
    assert (len(net.unet_module_names), len(net.text_encoder_module_names)) == (192, 72)


# ------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A peft-injected tiny UNet+TE with random non-zero LoRA weights, saved kohya-style."""
    unet, te = _load_models(tiny_dir)
    net = apply_lora(unet, te, dim=DIM, alpha=ALPHA)
    _randomize(net)
    inputs = _inputs(te)
    folder = tmp_path_factory.mktemp("lora_out")
    path = folder / checkpoint_filename("spyke", step=32)
    saved = save_lora_file(path, net.state_dict_kohya(), build_metadata(ALL_VALUES))
    return net, unet, te, inputs, saved


def test_diffusers_load_lora_weights_reproduces_peft_outputs(tiny_dir, trained):
    from diffusers import StableDiffusionPipeline

    net, unet, te, inputs, saved = trained
    want_unet, want_te = _outputs(unet, te, inputs)
    base_unet, base_te = _outputs(*_load_models(tiny_dir), inputs)
    # the LoRA really changes both models, so the comparison below means something
    assert (want_unet - base_unet).abs().max() > 1e-2
    assert (want_te - base_te).abs().max() > 1e-2

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(saved.path.parent, weight_name=saved.path.name)
    got_unet, got_te = _outputs(pipe.unet.eval(), pipe.text_encoder.eval(), inputs)
    assert (got_unet - want_unet).abs().max().item() <= 1e-5
    assert (got_te - want_te).abs().max().item() <= 1e-5


def test_load_state_dict_kohya_round_trip_and_strictness(tiny_dir, trained):
    net, unet, te, inputs, saved = trained
    want = _outputs(unet, te, inputs)
    tensors, meta = read_lora_file(saved.path)
    assert meta["ss_network_dim"] == str(DIM)

    unet2, te2 = _load_models(tiny_dir)
    net2 = apply_lora(unet2, te2, dim=DIM, alpha=ALPHA)
    net2.load_state_dict_kohya(tensors)
    got = _outputs(unet2, te2, inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(net2.state_dict_kohya().values(), net.state_dict_kohya().values()))

    missing = dict(tensors)
    missing.pop(next(iter(missing)))
    extra = dict(tensors) | {"lora_unet_conv_in.lora_down.weight": torch.zeros(DIM, 4, 3, 3)}
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"
    wrong_shape = dict(tensors) | {key: torch.zeros(DIM + 1, *tensors[key].shape[1:])}
    akey = "lora_unet_mid_block_attentions_0_proj_in.alpha"
    wrong_alpha = dict(tensors) | {akey: torch.tensor(1.0)}
    for bad, pattern in ((missing, "missing"), (extra, "unexpected"), (wrong_shape, "shape"), (wrong_alpha, "network_alpha")):
        with pytest.raises(CheckpointError, match=pattern) as ei:
            net2.load_state_dict_kohya(bad)
        assert "\n" not in str(ei.value)
    # a file from a unet-only run does not fit a network with text-encoder adapters
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    with pytest.raises(CheckpointError, match="missing"):
        net2.load_state_dict_kohya(unet_only)


# ------------------------------------------------------------------------- metadata & hashes
def test_metadata_round_trip_and_hashes(trained):
    _, _, _, _, saved = trained
    tensors, meta = read_lora_file(saved.path)
    for key, value in ALL_VALUES.items():
        assert f"ss_{key}" in meta, key
        assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.5"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_unet_lr"] == "None" and meta["ss_noise_offset"] == "None"
    assert meta["ss_cache_latents"] == "True" and meta["ss_gradient_checkpointing"] == "False"
    assert meta["ss_resolution"] == "(128, 128)"
    assert json.loads(meta["ss_dataset_dirs"]) == ALL_VALUES["dataset_dirs"]
    assert json.loads(meta["ss_tag_frequency"]) == ALL_VALUES["tag_frequency"]
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    import datetime

    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation_version"] == f"spyke-cockpit/{importlib.metadata.version('spyke-cockpit')}"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "spyke"
    assert meta["modelspec.resolution"] == "128x128"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    no_skip = build_metadata({"output_name": "x", "clip_skip": None})
    assert "modelspec.encoder_layer" not in no_skip and no_skip["modelspec.resolution"] == "512x512"

    # sshs_model_hash: sha256 of the tensor-data region, recomputed from the file bytes
    raw = saved.path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() == saved.model_hash
    assert saved.sha256 == hashlib.sha256(raw).hexdigest() and saved.bytes == len(raw) and saved.verified
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == meta


def test_legacy_hash_matches_kohya_rule(tmp_path):
    """sshs_legacy_hash: sha256 of the 64 KiB at offset 1 MiB of the ss_-only serialization."""
    import safetensors.torch

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(400, 1000)}
    meta = {"ss_output_name": "big", "modelspec.title": "big"}
    saved = save_lora_file(tmp_path / "big.safetensors", tensors, meta)
    _, got = read_lora_file(saved.path)
    ss_blob = safetensors.torch.save(tensors, {"ss_output_name": "big"})
    assert got["sshs_legacy_hash"] == hashlib.sha256(ss_blob[0x100000:0x110000]).hexdigest()[:8]
    n = int.from_bytes(ss_blob[:8], "little")
    assert got["sshs_model_hash"] == hashlib.sha256(ss_blob[8 + n:]).hexdigest()


# ------------------------------------------------------------------------- atomic save
def _tensors():
    return {"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.alpha": torch.tensor(1.0)}


def test_non_finite_tensor_leaves_nothing(tmp_path):
    bad = _tensors() | {"lora_unet_b.lora_up.weight": torch.tensor([[1.0, float("nan")]])}
    with pytest.raises(CheckpointError, match="lora_unet_b.lora_up.weight") as ei:
        save_lora_file(tmp_path / "x.safetensors", bad, {})
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_enospc_keeps_older_file_and_removes_temp(tmp_path, monkeypatch, where):
    path = tmp_path / "spyke.safetensors"
    first = save_lora_file(path, _tensors(), {"ss_steps": "1"})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Failing(real_fdopen(*a, **k)))
    t = _tensors()
    t["lora_unet_a.lora_down.weight"] = t["lora_unet_a.lora_down.weight"] * 2
    with pytest.raises(CheckpointError) as ei:
        save_lora_file(path, t, {"ss_steps": "2"})
    msg = str(ei.value)
    assert str(path) in msg and os.strerror(errno.ENOSPC) in msg and "\n" not in msg
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spyke.safetensors"]
    assert read_lora_file(path)[1]["sshs_model_hash"] == first.model_hash


def test_missing_folder_and_unwritable(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "x.safetensors"
    with pytest.raises(CheckpointError, match="No such file or directory") as ei:
        save_lora_file(missing, _tensors(), {})
    assert str(missing) in str(ei.value)
    assert not (tmp_path / "nope").exists()

    # EACCES when creating the temp file (simulated: the suite may run as root)
    real_open = os.open

    def denied(p, flags, *a, **k):
        if ".tmp-" in str(p):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="Permission denied") as ei:
        save_lora_file(tmp_path / "x.safetensors", _tensors(), {})
    assert str(tmp_path / "x.safetensors") in str(ei.value) and "\n" not in str(ei.value)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_cleanup_temp_files_and_read_errors(tmp_path):
    save_lora_file(tmp_path / "keep.safetensors", _tensors(), {})
    stale = [tmp_path / ".spyke-step00000010.safetensors.tmp-4242-deadbeef", tmp_path / ".spyke.safetensors.tmp-1-00ff00ff"]
    for p in stale:
        p.write_bytes(b"partial")
    other = [tmp_path / ".hidden", tmp_path / "notes.tmp-1-ab", tmp_path / "keep.safetensors"]
    other[0].write_text("x")
    other[1].write_text("x")
    assert cleanup_temp_files(tmp_path) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in other)
    assert cleanup_temp_files(tmp_path / "absent") == []

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes((tmp_path / "keep.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        read_lora_file(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")


def test_checkpoint_files_take_kohyas_names_in_kohyas_lora_formats():
    assert checkpoint_filename("spyke", step=250) == "spyke-step00000250.safetensors"
    assert checkpoint_filename("spyke", epoch=3) == "spyke-000003.safetensors"
    assert checkpoint_filename("spyke") == "spyke.safetensors"
    assert checkpoint_filename("spyke", ext=".safetensors") == "spyke.safetensors"
    # kohya's names without --output_name
    assert checkpoint_filename(None, step=5) == "at-step00000005.safetensors"
    assert checkpoint_filename(None, epoch=1) == "epoch-000001.safetensors"
    assert checkpoint_filename(None) == "last.safetensors"
    assert checkpoint_filename("spyke", step=250, ext="ckpt") == "spyke-step00000250.ckpt"
    assert checkpoint_filename("spyke", ext="pt") == "spyke.pt"
    for ext in ("diffusers", "diffusers_safetensors", "bin"):      # kohya's full-model formats: not a LoRA file
        with pytest.raises(ConfigError, match="save_model_as.*safetensors, ckpt or pt"):
            checkpoint_filename("spyke", ext=ext)
    with pytest.raises(ConfigError, match="output_name"):
        checkpoint_filename("a/b")
