"""kohya's --fp8_base / --fp8_base_unet on the tiny model: the frozen base weights are stored in float8 and
computed under autocast while the LoRA trains in fp32; one line where a device, the precision or the network
cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.events import LogMessage, StepCompleted
from engine.tiny import generate_dataset

F8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_cache):
    small = generate_dataset(tmp_path_factory.mktemp("fp8"), num_images=2, num_repeats=1, resolution=64, seed=3)
    return {"model": tiny_cache / "tiny-sd15", "small": small}


def make_config(assets, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(assets["model"]), dataset_config=str(assets["small"].dataset_toml),
                  resolution="64", max_train_steps=2, output_dir=str(out), output_name="fp8", network_dim=2,
                  network_alpha=1.0, learning_rate=1e-3, seed=7, device="cpu", mixed_precision="bf16")
    values.update(overrides)
    return TrainConfig(**values)


def train(cfg):
    from engine.trainer import Trainer

    events: list = []
    result = Trainer(cfg, sinks=[events.append]).run()
    return result, events


def setup(assets, cfg):
    from engine.models import load_base_model
    from engine.train.setup import setup_models

    return setup_models(cfg, load_base_model(assets["model"]), torch.device("cpu"), 1)


def dtypes(module, network) -> dict[str, set]:
    """The dtypes of the module's base parameters by layer kind (the network's own left out)."""
    own = {id(p) for p in network.unet_params + network.text_encoder_params}
    out: dict[str, set] = {}
    for sub in module.modules():
        kind = type(sub).__name__
        for p in sub.parameters(recurse=False):
            if id(p) not in own:
                out.setdefault(kind, set()).add(p.dtype)
    return out


def test_fp8_base_stores_the_unet_and_text_encoder_in_float8_and_keeps_the_lora_fp32(assets, tmp_path):
    m = setup(assets, make_config(assets, tmp_path / "o", fp8_base=True))
    unet, te = dtypes(m.unet, m.network), dtypes(m.te, m.network)
    assert unet["Linear"] == unet["Conv2d"] == te["Linear"] == {F8}
    assert te["Embedding"] == {torch.bfloat16}            # kohya keeps the text embeddings in the compute dtype
    # the CPU's norm kernels take no float8: the float8-rounded values, held in bf16
    norm = next(sub for sub in m.unet.modules() if isinstance(sub, torch.nn.GroupNorm))
    assert norm.weight.dtype == torch.bfloat16 and torch.equal(norm.weight, norm.weight.to(F8).to(torch.bfloat16))
    assert {p.dtype for p in m.network.unet_params + m.network.text_encoder_params} == {torch.float32}
    (line,) = [n for n in m.notes if n.startswith("--fp8_base: ")]
    assert line.startswith("--fp8_base: the base U-Net and text encoder weights are stored in float8_e4m3fn (")
    assert line.endswith("computed in bfloat16 under autocast; this device's norm kernels take no float8, so the "
                         "norm layers hold the float8-rounded values in bfloat16")


def test_fp8_base_unet_leaves_the_text_encoder_in_mixed_precision(assets, tmp_path):
    m = setup(assets, make_config(assets, tmp_path / "o", fp8_base_unet=True))
    assert dtypes(m.unet, m.network)["Linear"] == {F8}
    assert dtypes(m.te, m.network)["Linear"] == {torch.bfloat16}
    assert any(n.startswith("--fp8_base_unet: the base U-Net weights are stored in float8_e4m3fn") for n in m.notes)


def test_a_run_over_a_float8_base_trains_the_lora_and_differs_from_the_bf16_base(assets, tmp_path):
    result, events = train(make_config(assets, tmp_path / "fp8", fp8_base=True))
    assert result.status == "completed", result.error
    plain, plain_events = train(make_config(assets, tmp_path / "bf16"))
    assert plain.status == "completed", plain.error
    fp8_losses = [e.loss for e in events if isinstance(e, StepCompleted)]
    bf16_losses = [e.loss for e in plain_events if isinstance(e, StepCompleted)]
    assert len(fp8_losses) == 2 and all(torch.isfinite(torch.tensor(fp8_losses)))
    assert fp8_losses != bf16_losses                       # the forward really ran on the float8 weights
    assert abs(fp8_losses[0] - bf16_losses[0]) < 0.5 * bf16_losses[0]
    ups = [t for k, t in load_file(result.final_path).items() if k.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.float32 for t in ups) and any(t.abs().sum() > 0 for t in ups)
    assert any(isinstance(e, LogMessage) and e.message.startswith("--fp8_base: ") for e in events)
    from engine.checkpoint import read_lora_metadata

    meta = read_lora_metadata(result.final_path)
    assert (meta["ss_fp8_base"], meta["ss_fp8_base_unet"]) == ("True", "False")


def test_sample_images_draw_from_a_float8_base(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n")
    result, events = train(make_config(assets, tmp_path / "o", fp8_base=True, max_train_steps=1,
                                       sample_prompts=str(prompts), sample_at_first=True))
    assert result.status == "completed", result.error
    assert not [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    assert list((tmp_path / "o").rglob("*.png"))


@pytest.mark.parametrize("flag", ["fp8_base", "fp8_base_unet"])
def test_fp8_base_without_mixed_precision_is_one_line_as_in_kohya(assets, tmp_path, flag):
    with pytest.raises(ConfigError) as info:
        make_config(assets, tmp_path / "o", mixed_precision="no", **{flag: True}).validate()
    assert str(info.value) == (f"--{flag} needs --mixed_precision=fp16 or bf16, as in kohya: the float8 weights "
                               "compute under autocast")


def test_the_device_is_asked_whether_float8_weights_compute_there():
    from engine.models import Float8Plan, fp8_base_plan

    # measured: the CPU runs float8 Linear/Conv2d under autocast, but its norm kernels refuse float8 parameters
    assert fp8_base_plan(True, False, "cpu", "networks.lora", torch.bfloat16) == Float8Plan(F8, norms_in_float8=False)
    assert fp8_base_plan(False, False, "cpu", "networks.lora", torch.bfloat16) is None


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine where MPS cannot compute")
def test_fp8_base_where_the_device_cannot_compute_float8_is_one_line():
    from engine.models import fp8_base_plan

    with pytest.raises(ConfigError) as info:
        fp8_base_plan(False, True, "mps", "networks.lora", torch.bfloat16)
    message = str(info.value)
    assert message.startswith("--fp8_base_unet: float8 weights cannot compute on mps here (")
    assert message.endswith("); remove --fp8_base_unet (it trains on CUDA and the CPU)") and "\n" not in message


def test_fp8_base_with_a_lycoris_network_is_refused_before_anything_trains(assets, tmp_path):
    result, events = train(make_config(assets, tmp_path / "o", fp8_base=True, network_module="lycoris.kohya",
                                       network_args=["algo=locon"]))
    assert result.status == "failed" and result.global_step == 0
    assert result.error == ("--fp8_base: lycoris.kohya computes from the base weights themselves, which float8 "
                            "cannot hold here; use --network_module=networks.lora or networks.dylora, or remove "
                            "--fp8_base")


def test_fp8_base_flags_parse_from_the_kohya_command_line():
    from engine.cli_args import make_parser, parse_train_args

    parser = make_parser("spyke-cockpit train", "test", extra=[(("--headless",), {"action": "store_true"})])
    notes: list[str] = []
    cfg = parse_train_args(parser, ["--fp8_base", "--fp8_base_unet", "--mixed_precision=bf16"], notes=notes)[1]
    assert (cfg.fp8_base, cfg.fp8_base_unet) == (True, True) and notes == []
