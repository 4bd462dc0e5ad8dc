"""Base-model loading: diffusers folder, LDM single file, clear errors, shipped SD1.5 config."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelLoadError
from engine.ldm_convert import diffusers_to_ldm_state_dict, write_ldm_single_file
from engine.models import DEFAULT_SD15_CONFIG_DIR, BaseModel, load_base_model
from engine.tiny import build_tiny_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_dir, tmp_path_factory):
    return write_ldm_single_file(tiny_dir, tmp_path_factory.mktemp("ldm") / "tiny-sd15.safetensors")


@pytest.fixture(scope="session")
def folder_model(tiny_dir) -> BaseModel:
    return load_base_model(tiny_dir)


def _outputs(model: BaseModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    image = torch.rand(1, 3, 128, 128, generator=gen) * 2 - 1
    ids = model.tokenizer(["spyke, red jacket, night sky"], padding="max_length", max_length=77,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids).last_hidden_state
        return {
            "text": hidden,
            "unet": model.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample,
            "vae": model.vae.encode(image).latent_dist.mean,
            "ids": ids,
        }


def test_diffusers_folder_loads_fp32(folder_model, tiny_dir):
    assert folder_model.source == "diffusers"
    assert folder_model.model_name == tiny_dir.name
    assert folder_model.sha256() is None
    for module in (folder_model.unet, folder_model.vae, folder_model.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert not module.training


def test_single_file_matches_folder(folder_model, tiny_single_file, tiny_dir):
    single = load_base_model(tiny_single_file, sd_config_dir=tiny_dir)
    assert single.source == "single_file"
    assert single.model_name == "tiny-sd15.safetensors"
    expected, got = _outputs(folder_model), _outputs(single)
    assert torch.equal(expected["ids"], got["ids"])
    for name in ("text", "unet", "vae"):
        assert got[name].shape == expected[name].shape
        assert (got[name] - expected[name]).abs().max().item() <= 1e-5, name
    # sha256 is the whole file's, computed once and cached (metadata ss_new_sd_model_hash).
    assert single.file_sha256 is None
    digest = hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()
    assert single.sha256() == digest and single.file_sha256 == digest


def test_ldm_file_uses_original_key_layout(tiny_single_file):
    from safetensors import safe_open

    with safe_open(str(tiny_single_file), framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert len(q_shape) == 4 and q_shape[2:] == [1, 1]  # LDM's VAE attention is 1x1 convs
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}


def test_pickle_ckpt_refused_unless_allowed(tiny_single_file, tiny_dir, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_file))}, ckpt)
    with pytest.raises(ModelLoadError, match="--allow_pickle") as err:
        load_base_model(ckpt, sd_config_dir=tiny_dir)
    assert str(ckpt) in str(err.value)
    model = load_base_model(ckpt, sd_config_dir=tiny_dir, allow_pickle=True)
    assert model.source == "single_file" and model.model_name == "tiny.ckpt"


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_missing_path_names_path_and_flag(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(ModelLoadError) as err:
        load_base_model(missing)
    text = _one_line(err)
    assert "not found" in text and str(missing) in text and "--pretrained_model_name_or_path=" in text


def test_folder_without_model_index_or_unet(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        load_base_model(tmp_path)
    _one_line(err)
    (tmp_path / "model_index.json").write_text((tiny_dir / "model_index.json").read_text())
    with pytest.raises(ModelLoadError, match="unet/") as err:
        load_base_model(tmp_path)
    _one_line(err)


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
          "model.diffusion_model.input_blocks.0.0.weight"], "SDXL"),
        (["cond_stage_model.model.token_embedding.weight",
          "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quant_conv.weight"], "SD2"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["something.else"], "not a Stable Diffusion checkpoint"),
    ],
)
def test_non_sd1_safetensors_refused(tmp_path, keys, needle):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(ModelLoadError, match=needle) as err:
        load_base_model(path)
    text = _one_line(err)
    assert str(path) in text and "SD1.x" in text


def test_inpainting_unet_refused(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        "first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1),
    }, str(path))
    with pytest.raises(ModelLoadError, match="9 input channels"):
        load_base_model(path)


def test_junk_and_truncated_files_refused(tiny_single_file, tiny_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors") as err:
        load_base_model(junk)
    assert str(junk) in _one_line(err)
    cut = tmp_path / "cut.safetensors"
    data = tiny_single_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load_base_model(cut, sd_config_dir=tiny_dir)
    assert str(cut) in _one_line(err)


def test_config_mismatch_is_one_clear_line(tiny_single_file):
    # The tiny weights do not fit the shipped full-size SD1.5 config: wrapped, not a traceback.
    with pytest.raises(ModelLoadError, match="could not load .* as an SD1.x checkpoint") as err:
        load_base_model(tiny_single_file)
    assert str(tiny_single_file) in _one_line(err)


def test_shipped_tokenizer_is_real_clip_bpe():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(DEFAULT_SD15_CONFIG_DIR / "tokenizer", local_files_only=True)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == "<|endoftext|>"


def test_shipped_sd15_configs_have_real_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = DEFAULT_SD15_CONFIG_DIR
    assert json.loads((cfg / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))

    def count(m):
        assert all(p.is_meta for p in m.parameters())
        return sum(p.numel() for p in m.parameters())

    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    # The full-size LDM layout we write is what diffusers' own converters read back.
    ldm = diffusers_to_ldm_state_dict(unet, vae, text)
    assert len(ldm) == 1130  # 686 UNet + 248 VAE + 196 text encoder tensors
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == set(vae.state_dict())
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm


def test_legacy_model_hash_is_sha256_of_64_kib_at_1_mib(tmp_path):
    import random

    data = random.Random(0).randbytes(0x120000)         # 1.125 MiB, so the hashed window is all there
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    single = BaseModel(unet=None, vae=None, text_encoder=None, tokenizer=None, source="single_file",
                       model_name=path.name, path=path)
    assert single.legacy_hash() == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert single.legacy_hash() != hashlib.sha256(data[:0x10000]).hexdigest()[:8]
    folder = BaseModel(unet=None, vae=None, text_encoder=None, tokenizer=None, source="diffusers",
                       model_name="m", path=tmp_path)
    assert folder.legacy_hash() is None


def test_clip_skip_deeper_than_the_text_encoder_is_refused_at_plan_time(tiny_cache, tiny_single_file, tmp_path):
    from engine.config import TrainConfig
    from engine.errors import ConfigError
    from engine.plan import plan_run, text_encoder_layers

    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"), output_dir=str(tmp_path / "o"),
                      dataset_config=str(tiny_cache / "demo-dataset" / "dataset.toml"), resolution="64")
    assert text_encoder_layers(cfg) == 5                                            # the folder's own config
    assert text_encoder_layers(cfg.replace(pretrained_model_name_or_path=str(tiny_single_file))) == 12  # shipped
    assert text_encoder_layers(cfg.replace(pretrained_model_name_or_path=str(tiny_single_file),
                                           sd_config_dir=str(tiny_cache / "tiny-sd15"))) == 5
    assert plan_run(cfg.replace(clip_skip=5)).total_steps > 0
    with pytest.raises(ConfigError) as info:
        plan_run(cfg.replace(clip_skip=6))
    assert str(info.value) == "--clip_skip=6: the text encoder has 5 layers; use 1..5"
    assert not (tmp_path / "o").exists()


def test_clip_skip_is_checked_against_the_loaded_text_encoder(tiny_cache, tmp_path, monkeypatch):
    import engine.plan
    from engine.config import TrainConfig
    from engine.trainer import Trainer

    monkeypatch.setattr(engine.plan, "text_encoder_layers", lambda config: None)   # config not readable up front
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"), output_dir=str(tmp_path / "o"),
                      dataset_config=str(tiny_cache / "demo-dataset" / "dataset.toml"), resolution="64",
                      max_train_steps=1, clip_skip=7, seed=1)
    result = Trainer(cfg).run()
    assert (result.status, result.global_step) == ("failed", 0)
    assert result.error == "--clip_skip=7: the text encoder has 5 layers; use 1..5"


def test_external_vae_loads_from_a_folder_and_a_single_file(folder_model, tiny_dir, tiny_single_file, tmp_path):
    import torch

    from engine.models import load_external_vae

    folder = tmp_path / "vae"
    folder_model.vae.save_pretrained(folder)
    want = folder_model.vae.state_dict()
    for vae in (load_external_vae(folder), load_external_vae(tiny_single_file, sd_config_dir=tiny_dir)):
        got = vae.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_external_vae_that_is_missing_or_pickle_is_one_line_naming_the_flag(tmp_path):
    from engine.models import load_external_vae

    with pytest.raises(ModelLoadError, match=r"^--vae: .*not found"):
        load_external_vae(tmp_path / "nope.safetensors")
    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"^--vae: .*only \.safetensors"):
        load_external_vae(pickle)


def test_attention_kernel_reports_pytorch_fused_attention(folder_model):
    from engine.models import attention_kernel

    assert attention_kernel(folder_model.unet) == "AttnProcessor2_0"


def test_full_fp16_on_cpu_is_refused_in_one_line():
    from engine.errors import ConfigError
    from engine.models import full_precision_dtype
    import torch

    assert full_precision_dtype(False, False, "cpu") is None
    assert full_precision_dtype(False, True, "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match=r"^--full_fp16: the CPU cannot train in fp16"):
        full_precision_dtype(True, False, "cpu")
