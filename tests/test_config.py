"""The typed config and the kohya-spelled command line (parse only: no torch, no training)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from engine.cli_args import make_parser, parse_train_args
from engine.config import FIELDS, TrainConfig
from engine.config_io import build_config, to_toml
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
REFERENCE_PRESET = REPO / "configs" / "spyke_plasma_v1.toml"
REFERENCE_PLAN = REPO.parent / "shared" / "seed" / "000_9d32995821235827.txt"

# The flags of the reference job's `accelerate launch … train_network.py` command, verbatim but for the
# three paths, which are the user's machine's (checked against the reference plan below when it is present).
PATH_FLAGS = ("pretrained_model_name_or_path", "dataset_config", "output_dir")
REFERENCE_COMMAND = r'''
  --pretrained_model_name_or_path="MODEL.safetensors" \
  --dataset_config="DATASET.toml" \
  --output_dir="OUTPUT/" \
  --output_name="spyke_plasma_v1" \
  --save_model_as="safetensors" \
  --save_every_n_steps=200 \
  --max_train_epochs=4 \
  --learning_rate=1e-4 \
  --unet_lr=1e-4 \
  --text_encoder_lr=5e-5 \
  --lr_scheduler="cosine" \
  --lr_warmup_steps=0 \
  --network_module="networks.lora" \
  --network_dim=32 \
  --network_alpha=16 \
  --mixed_precision="no" \
  --save_precision="float" \
  --optimizer_type="AdamW" \
  --no_half_vae \
  --clip_skip=2 \
  --prior_loss_weight=1.0 \
  --max_data_loader_n_workers=1 \
  --persistent_data_loader_workers \
  --gradient_checkpointing \
  --seed=42
'''

# Every flag the issue says `train --headless` must accept in kohya's spelling.
REFERENCE_FLAGS = """pretrained_model_name_or_path dataset_config output_dir output_name save_model_as save_every_n_steps
save_every_n_epochs max_train_epochs max_train_steps learning_rate unet_lr text_encoder_lr lr_scheduler lr_warmup_steps
network_module network_dim network_alpha mixed_precision save_precision optimizer_type no_half_vae clip_skip
prior_loss_weight max_data_loader_n_workers persistent_data_loader_workers gradient_checkpointing cache_latents seed
train_batch_size resolution noise_offset min_snr_gamma max_grad_norm""".split()


def train_parser():
    """The same parser shape as `spyke-cockpit train`."""
    return make_parser("spyke-cockpit train", "test", extra=[
        (("--headless",), {"action": "store_true"}),
        (("--detach",), {"action": "store_true"}),
    ])


def reference_argv(model: str, dataset: str, output: str) -> list[str]:
    argv = shlex.split(REFERENCE_COMMAND.replace("\\\n", " "))
    subs = {"--pretrained_model_name_or_path": model, "--dataset_config": dataset, "--output_dir": output}
    out = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        out.append(f"{name}={subs[name]}" if name in subs else arg)
    return out


def test_reference_flags_match_the_reference_plan():
    if not REFERENCE_PLAN.exists():
        pytest.skip("the reference plan is not beside this checkout")
    text = REFERENCE_PLAN.read_text()
    block = text.split("train_network.py \\", 1)[1].split("```", 1)[0]
    paths = re.compile(r'(--(?:%s)=)"[^"]*"' % "|".join(PATH_FLAGS))

    def norm(command: str) -> str:
        return paths.sub(r'\1"PATH"', re.sub(r"\s+", " ", command.replace("\\\n", " ")).strip())

    assert norm(block) == norm(REFERENCE_COMMAND)


def test_every_reference_flag_is_a_config_field():
    missing = [f for f in REFERENCE_FLAGS if f not in FIELDS]
    assert missing == []
    # …and each has help text (the cockpit form and --help are generated from it)
    assert all(FIELDS[f].metadata["help"] for f in REFERENCE_FLAGS)


def test_reference_command_line_is_accepted(tmp_path):
    argv = ["--headless", *reference_argv(str(tmp_path / "model"), str(tmp_path / "ds.toml"), str(tmp_path / "out"))]
    ns, cfg = parse_train_args(train_parser(), argv)
    assert ns.headless
    assert cfg.pretrained_model_name_or_path == str(tmp_path / "model")
    assert cfg.dataset_config == str(tmp_path / "ds.toml")
    assert cfg.output_name == "spyke_plasma_v1"
    assert cfg.save_model_as == "safetensors"
    assert cfg.save_every_n_steps == 200
    assert cfg.max_train_epochs == 4
    assert cfg.learning_rate == 1e-4 and cfg.unet_lr == 1e-4 and cfg.text_encoder_lr == 5e-5
    assert cfg.effective_unet_lr() == 1e-4 and cfg.effective_text_encoder_lr() == 5e-5
    assert cfg.lr_scheduler == "cosine" and cfg.lr_warmup_steps == 0
    assert cfg.network_module == "networks.lora"
    assert cfg.network_dim == 32 and isinstance(cfg.network_dim, int)
    assert cfg.network_alpha == 16.0
    assert cfg.mixed_precision == "no" and cfg.save_precision == "float"
    assert cfg.optimizer_type == "AdamW"
    assert cfg.no_half_vae is True
    assert cfg.clip_skip == 2
    assert cfg.prior_loss_weight == 1.0
    assert cfg.max_data_loader_n_workers == 1 and cfg.persistent_data_loader_workers is True
    assert cfg.gradient_checkpointing is True
    assert cfg.seed == 42
    assert cfg.cache_latents is False  # not in the reference job's command
    cfg.validate()


def test_reference_command_equals_the_preset(tmp_path):
    """configs/spyke_plasma_v1.toml is the reference job: same config once the paths are filled in."""
    paths = dict(pretrained_model_name_or_path="m", dataset_config="d.toml", output_dir="o")
    _, from_flags = parse_train_args(train_parser(), reference_argv("m", "d.toml", "o"))
    from_preset = build_config(REFERENCE_PRESET, paths)
    diff = {k: (v, getattr(from_preset, k)) for k, v in from_flags.to_dict().items()
            if getattr(from_preset, k) != v and k != "save_state"}   # the preset also keeps state for --resume
    assert diff == {}


def test_command_line_overrides_toml():
    _, cfg = parse_train_args(train_parser(), [str(REFERENCE_PRESET), "--network_dim=8", "--lr_scheduler", "linear",
                                               "--pretrained_model_name_or_path=x", "--cache_latents"])
    assert cfg.network_dim == 8                 # flag wins
    assert cfg.lr_scheduler == "linear"         # space-separated value form works too
    assert cfg.network_alpha == 16.0            # untouched TOML value kept
    assert cfg.pretrained_model_name_or_path == "x"
    assert cfg.cache_latents is True
    assert cfg.clip_skip == 2


def test_defaults_without_toml():
    _, cfg = parse_train_args(train_parser(), [])
    assert cfg == TrainConfig()
    assert cfg.caption_extension == ".caption" and cfg.max_grad_norm == 1.0 and cfg.network_dim == 4


@pytest.mark.parametrize("argv, needle", [
    (["--no_such_flag=1"], "--no_such_flag"),
    (["--netwrk_dim", "4"], "--netwrk_dim"),
    (["--network_d=4"], "--network_d"),            # the start of several flags (kohya's argparse: ambiguous)
    (["--network_dim=abc"], "network_dim"),
    (["--learning_rate=fast"], "learning_rate"),
    (["--max_train_epochs=1.5"], "max_train_epochs"),
    (["--gradient_checkpointing=maybe"], "gradient_checkpointing"),
    (["notatoml.txt"], "notatoml.txt"),
])
def test_parse_errors_are_one_line_naming_the_flag(argv, needle):
    with pytest.raises(ConfigError) as info:
        parse_train_args(train_parser(), argv)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("overrides, field", [
    ({"network_dim": 0}, "network_dim"),
    ({"network_dim": -3}, "network_dim"),
    ({"network_alpha": -1.0}, "network_alpha"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"save_precision": "double"}, "save_precision"),
    ({"network_module": "networks.lycoris"}, "network_module"),
    ({"resolution": "32"}, "resolution"),
    ({"resolution": "512,abc"}, "resolution"),
    ({"output_name": "a/b"}, "output_name"),
    ({"pretrained_model_name_or_path": ""}, "pretrained_model_name_or_path"),
    ({"dataset_config": "", "train_data_dir": ""}, "dataset_config"),
    ({"train_batch_size": 0}, "train_batch_size"),
])
def test_validate_names_the_bad_field(overrides, field):
    values = {"pretrained_model_name_or_path": "m", "dataset_config": "d.toml", **overrides}
    cfg = TrainConfig(**values)
    assert field in cfg.problems()
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert f"--{field}" in str(info.value) and "\n" not in str(info.value)


def test_valid_config_has_no_problems():
    assert TrainConfig(pretrained_model_name_or_path="m", train_data_dir="x").problems() == {}


def test_toml_errors_name_file_and_key(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[network]\nnetwork_dimm = 4\n")
    with pytest.raises(ConfigError) as info:
        build_config(bad_key)
    assert "bad_key.toml" in str(info.value) and "network_dimm" in str(info.value)

    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text("[network]\nnetwork_dim = \"big\"\n")
    with pytest.raises(ConfigError) as info:
        build_config(bad_type)
    assert "bad_type.toml" in str(info.value) and "network_dim" in str(info.value)

    broken = tmp_path / "broken.toml"
    broken.write_text("[network\n")
    with pytest.raises(ConfigError) as info:
        build_config(broken)
    assert "broken.toml" in str(info.value)

    with pytest.raises(ConfigError) as info:
        build_config(tmp_path / "missing.toml")
    assert "missing.toml" in str(info.value)


def test_toml_types_and_resolution_list(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("network_alpha = 16\nresolution = [768, 512]\nmax_train_epochs = 2\n[x]\nseed = 7\n")
    cfg = build_config(p)
    assert cfg.network_alpha == 16.0 and isinstance(cfg.network_alpha, float)
    assert cfg.resolution_wh() == (768, 512)
    assert cfg.max_train_epochs == 2 and cfg.seed == 7


def test_to_toml_round_trip(tmp_path):
    cfg = build_config(REFERENCE_PRESET, {"pretrained_model_name_or_path": "m", "dataset_config": "d.toml",
                                     "noise_offset": 0.05, "resolution": "768,512"})
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert build_config(path) == cfg


@pytest.mark.parametrize("text", [
    '[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "img"\n',
    '[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "img"\nnum_repeats = 10\n',
    '[general]\nbatch_size = 4\ncaption_extension = ".txt"\n',
])
def test_a_dataset_toml_given_as_the_preset_says_to_pass_it_as_dataset_config(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_train_args(make_parser("spyke-cockpit train", ""), [str(path)])
    assert str(info.value) == (f"{path}: this is a kohya dataset config; pass it as --dataset_config={path} "
                               "(the positional argument is a training preset)")


def test_a_preset_with_a_general_table_of_training_keys_still_loads(tmp_path):
    path = tmp_path / "preset.toml"
    path.write_text('[general]\nresolution = 768\ncaption_extension = ".txt"\nnetwork_dim = 8\n')
    cfg = build_config(path)
    assert (cfg.resolution, cfg.caption_extension, cfg.network_dim) == ("768", ".txt", 8)


def test_an_output_name_too_long_for_the_file_system_is_refused_up_front(tmp_path):
    from engine.config_checks import name_max
    from engine.state import longest_written_name

    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="x", output_dir=str(tmp_path / "out"))
    most = name_max(tmp_path) - (len(longest_written_name("n")) - 1)
    fits = cfg.replace(output_name="n" * most)
    assert fits.problems() == {}
    (tmp_path / longest_written_name(fits.output_name)).write_bytes(b"")   # the longest name really fits
    with pytest.raises(ConfigError) as info:
        cfg.replace(output_name="n" * (most + 1)).validate()
    assert str(info.value).startswith(f"--output_name is {most + 1} characters long; use at most {most}:")
    assert not (tmp_path / "out").exists()
