"""kohya's --config_file, its flag table, and kohya commands in and out (parse only: no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import export_kohya, import_kohya
from engine.cli_args import make_parser, parse_train_args
from engine.config import FIELDS
from engine.config_io import coerce_value
from engine.errors import ConfigError
from engine.kohya_config import read_toml
from engine.kohya_flags import TABLE, decide

GUI_CONFIGS = Path(__file__).resolve().parent.parent.parent / "shared" / "kohya-gui-configs"
PLACEHOLDERS = {"TRAIN_DATA_DIR": "/data/train", "REG_DATA_DIR": "/data/reg", "OUTPUT_DIR": "/data/out",
                "DATASET_TOML": "/data/dataset.toml", "CONFIG_TOML": "/data/config.toml", "MODEL": "/data/model"}
# Keys of the GUI's configs that other parts of spyke-cockpit implement: refused until they land.
PENDING_KEYS = {
    "optimizer_type": {"optimizer_type"},  # Prodigy where prodigyopt is absent
}
# Values of fields the GUI emits and sd-scripts accepts that are still refused (none: bucket_reso_steps = 1
# and resolution = "512,650" train as in kohya).
VALUE_PENDING: set[str] = set()


def parser():
    return make_parser("spyke-cockpit train", "test", extra=[(("--headless",), {"action": "store_true"})])


def parse(argv, notes=None):
    return parse_train_args(parser(), argv, notes=[] if notes is None else notes)[1]


def refused_keys(values: dict) -> dict[str, str]:
    """Each key of a flattened kohya config that spyke-cockpit refuses, with its one line."""
    from engine.config import TrainConfig

    out = {}
    typed = {}
    for key, raw in values.items():
        if key in FIELDS:
            try:
                typed[key] = coerce_value(key, raw, "cfg")
            except ConfigError:
                pass
    for key, raw in values.items():
        try:
            value = coerce_value(key, raw, "cfg")
            if key in FIELDS:
                # with the config's other fields: some rules are between fields (adaptive_noise_scale, noise_offset)
                problem = TrainConfig(**{**typed, key: value}).problems().get(key)
                if problem:
                    raise ConfigError(problem)
            else:
                decide(key, value, values, "cfg")
        except ConfigError as err:
            out[key] = str(err)
    return out


def gui_configs():
    return sorted(GUI_CONFIGS.glob("*.config.toml")) if GUI_CONFIGS.is_dir() else []


@pytest.mark.skipif(not GUI_CONFIGS.is_dir(), reason="the kohya_ss GUI configs are not beside this checkout")
@pytest.mark.parametrize("path", gui_configs(), ids=lambda p: p.name.split(".")[0])
def test_gui_config_keys_are_accepted_except_those_pending_elsewhere(path, tmp_path):
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    flat = {}
    for key, value in __import__("tomllib").loads(text).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    pending = set().union(*PENDING_KEYS.values())
    refused = refused_keys(flat)
    unexpected = {k: v for k, v in refused.items() if k not in pending | VALUE_PENDING}
    assert unexpected == {}, unexpected


def test_config_file_is_flattened_typed_by_flag_and_overridden_by_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "/m"\nv2 = false\nvae = ""\n'
                   '[additional]\ntrain_data_dir = "/d"\nbucket_reso_steps = 64.0\nmax_train_steps = 10\n'
                   'text_encoder_lr = [5e-5, 5e-5]\nmax_token_length = 75\nxformers = true\nepoch = 3\n'
                   'lr_scheduler_args = []\nloss_type = "l2"\ndynamo_backend = "no"\n')
    notes = []
    config = parse([f"--config_file={tmp_path / 'run'}", "--max_train_steps", "20"], notes)
    assert (config.bucket_reso_steps, config.max_train_steps, config.text_encoder_lr) == (64, 20, 5e-5)
    assert config.train_data_dir == "/d" and config.vae == "" and config.lr_scheduler_args == []
    assert any(n.startswith("--xformers: accepted; xformers is not used; PyTorch's fused attention (SDPA) runs "
                            "instead") for n in notes)
    assert any(n.startswith("epoch: the GUI's epoch box; sd-scripts ignores it") for n in notes)
    assert any(n.startswith("--dynamo_backend=no: accepted") for n in notes)


def test_text_encoder_lr_takes_several_values_and_uses_the_first_as_kohya_does_for_one_text_encoder():
    notes = []
    assert parse(["--text_encoder_lr", "1e-4", "1e-4", "--network_dim", "8"], notes).text_encoder_lr == 1e-4
    assert notes == []
    assert parse(["--text_encoder_lr", "1e-4", "5e-5"], notes).text_encoder_lr == 1e-4
    assert notes == ["--text_encoder_lr 1e-4 5e-5: SD1.x has one text encoder; kohya's train_network.py uses the "
                     "first value, 0.0001, and so does spyke-cockpit"]
    assert parse(["--text_encoder_lr"]).text_encoder_lr is None          # nargs="*" with no value: unset


def test_text_encoder_lr_list_in_a_config_file_uses_the_first_value_with_one_line_naming_the_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[optimizer]\ntext_encoder_lr = [5e-5, 1e-4]\n")
    notes = []
    assert parse([f"--config_file={cfg}"], notes).text_encoder_lr == 5e-5
    assert notes == [f"{cfg} [optimizer]: text_encoder_lr 5e-05 0.0001: SD1.x has one text encoder; kohya's "
                     "train_network.py uses the first value, 5e-05, and so does spyke-cockpit"]


def test_a_stray_value_names_the_flag_before_it():
    with pytest.raises(ConfigError, match=r"^--output_name: takes one value, but 'lora' follows it; quote"):
        parse(["--output_name", "my", "lora"])


def test_a_key_of_a_config_file_that_is_no_flag_is_ignored_as_kohya_does_with_one_warning(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('learnig_rate = 1e-4\nnetwork_dim = 8\n[extra]\ngui_theme = "dark"\nconfig_file = "other"\n')
    notes = []
    config = parse([f"--config_file={cfg}"], notes)
    assert config.network_dim == 8 and config.learning_rate == 2e-6        # kohya's argparse never reads it
    assert notes == [
        f"warning: {cfg}: 'learnig_rate' is not a train_network.py flag; ignored, as kohya ignores it "
        "(misspelt? see `spyke-cockpit train --help`)",
        f"warning: {cfg} [extra]: 'gui_theme' is not a train_network.py flag; ignored, as kohya ignores it "
        "(misspelt? see `spyke-cockpit train --help`)",
        f"{cfg} [extra]: config_file is ignored inside a config file (kohya reads it from the command line only)"]


def test_a_config_file_key_that_is_a_refused_flag_keeps_the_flags_own_rule(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nv2 = true\n")
    with pytest.raises(ConfigError, match=r"c\.toml: --v2: SD2\.x base models are not supported"):
        parse([f"--config_file={cfg}"])


def test_an_unknown_key_in_a_preset_is_still_refused_naming_it(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("learnig_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"p\.toml: unknown option 'learnig_rate'"):
        parse([str(preset)])


@pytest.mark.parametrize("argv, message", [
    (["--v2"], "--v2: SD2.x base models are not supported"),
])
def test_flags_that_change_training_and_are_not_honoured_are_one_line_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as info:
        parse(argv)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("flag", ["--sdpa", "--mem_eff_attn", "--lowram", "--highvram", "--tokenizer_cache_dir=/x",
                                  "--vae_batch_size=4", "--ddp_static_graph", "--conditioning_data_dir=/c",
                                  "--console_log_level=INFO", "--persistent_data_loader_workers"])
def test_flags_that_cannot_change_the_weights_are_accepted(flag):
    notes = []
    parse([flag], notes)
    name = flag.split("=")[0][2:]
    assert name in FIELDS or any(n.startswith(f"--{name}") for n in notes)


def test_torch_compile_is_accepted_with_one_line_saying_the_model_runs_uncompiled():
    notes = []
    parse(["--torch_compile", "--dynamo_backend=inductor"], notes)
    assert sorted(notes) == [
        "--dynamo_backend=inductor: accepted; kohya compiles with it under --torch_compile, but spyke-cockpit "
        "runs the model uncompiled: torch.compile changes how fast the same math runs, not the trained weights",
        "--torch_compile: accepted; spyke-cockpit runs the model uncompiled: torch.compile changes how fast the "
        "same math runs, not the trained weights"]
    notes = []
    parse(["--dynamo_backend=inductor"], notes)
    assert notes == ["--dynamo_backend=inductor: accepted; kohya uses it only with --torch_compile, which is not "
                     "given, so nothing is compiled"]


def test_cache_latents_to_disk_is_its_own_setting_that_implies_caching_as_kohya_does():
    notes = []
    config = parse(["--cache_latents_to_disk"], notes)
    assert config.cache_latents_to_disk is True and notes == []   # a field of its own (the disk cache), no alias


def test_full_bf16_needs_bf16_mixed_precision():
    assert "needs --mixed_precision=bf16" in parse(["--full_bf16"]).problems()["full_bf16"]


def test_output_config_writes_the_given_flags_and_never_replaces_a_file(tmp_path):
    target = tmp_path / "out.toml"
    with pytest.raises(SystemExit) as done:
        parse([f"--config_file={target}", "--output_config", "--network_dim=8", "--text_encoder_lr", "1e-5"])
    assert done.value.code == 0
    assert read_toml(target) == {"network_dim": 8, "text_encoder_lr": 1e-5}
    assert parse([f"--config_file={target}"]).network_dim == 8
    with pytest.raises(ConfigError, match="already exists"):
        parse([f"--config_file={target}", "--output_config"])
    assert read_toml(target) == {"network_dim": 8, "text_encoder_lr": 1e-5}



def test_output_config_leaves_out_flags_given_at_kohyas_default_as_kohyas_does(tmp_path):
    target = tmp_path / "out.toml"
    with pytest.raises(SystemExit):
        parse([f"--config_file={target}", "--output_config", "--max_train_steps=1600", "--optimizer_type=AdamW",
               "--max_token_length=75", "--xformers", "--network_module=networks.lora", "--seed=3"])
    assert read_toml(target) == {"xformers": True, "network_module": "networks.lora", "seed": 3}


def test_output_config_leaves_out_the_wandb_api_key_as_kohya_does(tmp_path):
    target = tmp_path / "out.toml"
    with pytest.raises(SystemExit):
        parse([f"--config_file={target}", "--output_config", "--wandb_api_key=SECRET", "--network_dim=8"])
    assert read_toml(target) == {"network_dim": 8}
    assert "SECRET" not in target.read_text()


COMMAND = r'''#!/bin/bash
export HF_HOME=/tmp/hf
CUDA_VISIBLE_DEVICES=0 accelerate launch --num_cpu_threads_per_process=2 --mixed_precision bf16 \
  "./sd-scripts/train_network.py" \
  --pretrained_model_name_or_path="/models/my model.safetensors" \
  --train_data_dir '/data/my set' --output_name "my lora" \
  --text_encoder_lr 5e-5 5e-5 --xformers --network_dim=16 --lr_warmup_steps=0.1 \
  --optimizer_args weight_decay=0.1 betas=0.9,0.99 --seed 42  # my best run
'''


def test_import_kohya_reads_a_shell_command_as_users_keep_it(tmp_path):
    toml_text, notes = import_kohya(COMMAND)
    preset = tmp_path / "p.toml"
    preset.write_text(toml_text)
    config = parse([str(preset)])
    assert config.pretrained_model_name_or_path == "/models/my model.safetensors"
    assert (config.train_data_dir, config.output_name, config.text_encoder_lr) == ("/data/my set", "my lora", 5e-5)
    assert config.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"] and config.lr_warmup_steps == 0.1
    assert config.seed == 42 and config.mixed_precision == "no"
    assert any(n.startswith("--xformers") for n in notes)


def test_export_of_an_imported_command_parses_to_the_same_config(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(import_kohya(COMMAND)[0])
    command = export_kohya(str(preset))
    assert command.startswith("accelerate launch --num_cpu_threads_per_process=1 \\\n  train_network.py")
    again = tmp_path / "again.toml"
    again.write_text(import_kohya(command)[0])
    assert parse([str(again)]) == parse([str(preset)])


def test_import_kohya_of_an_output_config_command_writes_nothing_and_names_the_flag(tmp_path):
    target = tmp_path / "new.toml"
    with pytest.raises(ConfigError, match=r"^--output_config: import-kohya writes a preset"):
        import_kohya(f"accelerate launch train_network.py --config_file={target} --output_config --seed=1\n")
    assert not target.exists()


def test_import_kohya_without_a_command_is_one_line():
    with pytest.raises(ConfigError, match="no train_network.py command found"):
        import_kohya("echo hello\n")


def test_every_kohya_flag_outside_the_config_is_accepted_refused_with_a_reason_or_an_alias():
    from engine.kohya_flags import ALIAS, INFO, REFUSED

    assert {flag.status for flag in TABLE.values()} <= {INFO, REFUSED, ALIAS}
    assert all(flag.line or flag.decide for flag in TABLE.values() if flag.status != ALIAS)
    refused = [name for name, flag in TABLE.items() if flag.status == REFUSED]
    assert "base_weights" not in TABLE and "resize_interpolation" not in TABLE and "deepspeed" in refused
    with pytest.raises(ConfigError, match=r"^--deepspeed: DeepSpeed is not supported .*; remove it$"):
        decide("deepspeed", True, {}, "--deepspeed")


def _gui_keys_all_accepted(path: Path) -> bool:
    import tomllib

    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    flat = {}
    for key, value in tomllib.loads(text).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return not refused_keys(flat)


@pytest.mark.skipif(not GUI_CONFIGS.is_dir(), reason="the kohya_ss GUI configs are not beside this checkout")
@pytest.mark.parametrize("path", [p for p in gui_configs() if _gui_keys_all_accepted(p)],
                         ids=lambda p: p.name.split(".")[0])
def test_gui_config_whose_keys_all_parse_trains_one_step_as_the_gui_passes_it(path, tmp_path, tiny_cache):
    """The GUI's own arguments (``--config_file=CONFIG_TOML``) with its paths filled in, on the tiny model,
    one step (the only flag added); the GUI also writes the sample prompts file it names."""
    from engine.tiny import generate_dataset
    from engine.trainer import Trainer

    data = generate_dataset(tmp_path / "data", num_images=3, num_repeats=1, resolution=64, seed=2)
    image_dir = next((data.dataset_toml.parent / "img").iterdir())
    for caption in image_dir.glob("*.caption"):
        caption.rename(caption.with_suffix(".txt"))               # the GUI presets caption with .txt
    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    (out / "sample" / "prompt.txt").write_text("spyke, a cat --w 64 --h 64 --s 2 --d 1\n")
    paths = {"MODEL": str(tiny_cache / "tiny-sd15"), "TRAIN_DATA_DIR": str(image_dir.parent),
             "REG_DATA_DIR": "", "OUTPUT_DIR": str(out), "DATASET_TOML": "", "CONFIG_TOML": ""}
    text = path.read_text()
    for placeholder, value in paths.items():
        text = text.replace(placeholder, value)
    config_toml = tmp_path / "config.toml"
    config_toml.write_text(text)
    args = [line.replace("CONFIG_TOML", str(config_toml))
            for line in path.with_name(path.name.replace(".config.toml", ".gui_cmd.args")).read_text().split()]
    cfg = parse([*args, "--max_train_steps=1"])
    if cfg.mixed_precision == "fp16":
        # fp16 needs CUDA or MPS (as accelerate in kohya): on this CPU the run refuses in one line, and the
        # same preset trains with the one flag a CPU user adds (a command-line flag overrides the file)
        refused = Trainer(cfg).run()
        assert refused.status == "failed" and "--mixed_precision=fp16 needs a CUDA or MPS device" in refused.error
        assert "\n" not in refused.error and not (out / f"{cfg.output_name}.safetensors").exists()
        cfg = parse([*args, "--max_train_steps=1", "--mixed_precision=bf16"])
    result = Trainer(cfg).run()
    assert result.status == "completed", result.error
    assert (out / f"{cfg.output_name}.safetensors").is_file()


DATA_FLAGS = {"max_token_length": ("150", 150), "masked_loss": (None, True), "alpha_mask": (None, True),
              "in_json": ("meta.json", "meta.json"), "dataset_repeats": ("3", 3)}


@pytest.mark.parametrize("name", sorted(DATA_FLAGS))
def test_long_caption_mask_and_fine_tuning_flags_parse_from_the_cli_a_preset_and_a_config_file(name, tmp_path):
    raw, want = DATA_FLAGS[name]
    assert getattr(parse([f"--{name}"] + ([raw] if raw is not None else [])), name) == want
    literal = repr(want).lower() if isinstance(want, bool) else repr(want).replace("'", '"')
    preset = tmp_path / "preset.toml"
    preset.write_text(f"[dataset]\n{name} = {literal}\n")
    assert getattr(parse([str(preset)]), name) == want
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f"[additional]\n{name} = {literal}\n")
    assert getattr(parse([f"--config_file={kohya}"]), name) == want
    helps = [line for line in parser().format_help().splitlines() if line.startswith(f"  --{name} ")]
    assert len(helps) == 1


@pytest.mark.parametrize("value", ["76", "300", "0"])
def test_max_token_length_other_than_kohyas_choices_is_one_line(value):
    config = parse(["--max_token_length", value, "--pretrained_model_name_or_path=/m", "--train_data_dir=/d"])
    with pytest.raises(ConfigError, match=r"^--max_token_length must be (≥ 1|75, 150 or 225, kohya's choices)"):
        config.validate()
    assert len(config.problems()["max_token_length"].splitlines()) == 1


CHOICE_FIELDS = sorted(name for name, f in FIELDS.items() if f.metadata.get("choices"))


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_an_empty_string_for_a_choice_field_in_a_config_file_is_unset_as_the_gui_writes_it(name, tmp_path):
    from engine.config import field_default

    cfg = tmp_path / "gui.toml"
    cfg.write_text(f'[basic]\n{name} = ""\n')
    config = parse([f"--config_file={cfg}", "--pretrained_model_name_or_path=/m", "--train_data_dir=/d"])
    assert getattr(config, name) == field_default(name)
    assert name not in config.problems()


def test_empty_save_precision_and_sample_sampler_are_kohyas_defaults(tmp_path):
    cfg = tmp_path / "gui.toml"
    cfg.write_text('save_precision = ""\nsample_sampler = ""\nmixed_precision = "bf16"\n')
    config = parse([f"--config_file={cfg}"])
    assert (config.save_precision, config.sample_sampler, config.mixed_precision) == (None, "ddim", "bf16")


def test_max_token_length_75_is_kohyas_default_and_reads_as_unset(tmp_path):
    cfg = tmp_path / "gui.toml"
    cfg.write_text("max_token_length = 75\n")
    assert parse([f"--config_file={cfg}"]).max_token_length is None
    assert parse(["--max_token_length=75"]).max_token_length is None
    assert parse(["--max_token_length=225"]).max_token_length == 225


@pytest.mark.parametrize("raw, want", [("0.1", 0.1), ("10", 10), ("10%", 0.1), ("0%", 0), ("2.5%", 0.025)])
def test_warmup_and_decay_steps_parse_as_kohyas_int_or_float(raw, want):
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        value = getattr(parse([f"--{name}={raw}"]), name)
        assert value == pytest.approx(want) and type(value) is type(want)


@pytest.mark.parametrize("raw", ["100%", "150%", "ten%"])
def test_a_warmup_percentage_of_the_whole_run_or_more_is_one_line_naming_the_flag(raw):
    with pytest.raises(ConfigError) as info:
        parse([f"--lr_warmup_steps={raw}"])
    assert str(info.value).startswith("--lr_warmup_steps: lr_warmup_steps ") and "\n" not in str(info.value)


REFUSALS = {
    # name: (argv, the flag the one line starts with, text it holds)
    "a value after a switch": (["--xformers", "true"], "--xformers", "is a switch and takes no value (got 'true')"),
    "a value joined to a switch": (["--cache_latents=false"], "--cache_latents", "is a switch and takes no value"),
    "a value after a switch before a preset word": (["--network_dim=8", "--gradient_checkpointing", "yes"],
                                                    "--gradient_checkpointing", "write --gradient_checkpointing alone"),
    "a stray word after a flag": (["--output_name", "my", "lora"], "--output_name", "takes one value, but 'lora'"),
    "a stray word that is also a value": (["--output_name", "lora", "--seed", "1", "lora"], "--seed",
                                          "takes one value, but 'lora' follows it"),
    "a flag without its value": (["--network_dim"], "--network_dim", "needs a value: --network_dim=VALUE"),
    "several values after '='": (["--optimizer_args=weight_decay=0.1", "betas=0.9,0.99"], "--optimizer_args",
                                 "written with '=' it takes one value, but 'betas=0.9,0.99' follows it"),
    "the start of several flags": (["--max_train=4"], "--max_train",
                                   "is the start of several flags (--max_train_steps, --max_train_epochs)"),
}


def test_a_unique_start_of_a_flag_is_that_flag_as_in_kohyas_argparse():
    config = parse(["--max_train_epoch=4", "--network_di", "8"])
    assert (config.max_train_epochs, config.network_dim) == (4, 8)


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_command_line_refusals_are_one_line_starting_with_the_flag(name):
    argv, flag, text = REFUSALS[name]
    with pytest.raises(ConfigError) as info:
        parse(argv)
    message = str(info.value)
    assert message.startswith(f"{flag} ") or message.startswith(f"{flag}:"), message
    assert text in message and "\n" not in message


@pytest.mark.parametrize("name", ["SparseAdam", "LBFGS", "Muon", "torch.optim.Muon"])
def test_an_optimizer_that_cannot_train_a_lora_is_one_line_naming_optimizer_type_and_the_fix(name):
    config = parse([f"--optimizer_type={name}", "--pretrained_model_name_or_path=/m", "--train_data_dir=/d"])
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert str(info.value).startswith(f"--optimizer_type '{name}' cannot train a LoRA: ")
    assert "use --optimizer_type=AdamW" in str(info.value) and "\n" not in str(info.value)


WINDOWS_COMMANDS = {
    "cmd continuation": ("accelerate launch --num_cpu_threads_per_process=2 train_network.py ^\n"
                         "  --network_dim=8 ^\n  --seed=1\n", "--network_dim: line 1 ends in '^', a Windows cmd"),
    "PowerShell continuation": ("accelerate launch train_network.py `\n  --seed 1 `\n  --network_dim 8\n",
                                "--seed: line 1 ends in '`', a PowerShell line continuation"),
    "backslash path": (r'accelerate launch "C:\kohya\sd-scripts\train_network.py" --seed=1 '
                       r'--pretrained_model_name_or_path=C:\models\sd15.safetensors',
                       r"--pretrained_model_name_or_path: C:\models\sd15.safetensors is a Windows path"),
    "quoted backslash path": ('python train_network.py --train_data_dir "D:\\data\\my set" --seed 1\n',
                              r"--train_data_dir: D:\data\my set is a Windows path"),
}


@pytest.mark.parametrize("name", sorted(WINDOWS_COMMANDS))
def test_a_windows_command_is_refused_by_import_kohya_in_one_line_naming_the_flag(name):
    text, message = WINDOWS_COMMANDS[name]
    with pytest.raises(ConfigError) as info:
        import_kohya(text)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert "write paths with /" in str(info.value) or "write it with /" in str(info.value)


def test_a_posix_command_with_escaped_spaces_and_a_commented_windows_path_still_imports(tmp_path):
    toml_text, _ = import_kohya("python train_network.py --output_name my\\ lora \\\n  --seed 1  # was C:\\runs\n")
    preset = tmp_path / "p.toml"
    preset.write_text(toml_text)
    assert (parse([str(preset)]).output_name, parse([str(preset)]).seed) == ("my lora", 1)


def test_train_help_gives_each_flag_one_line_and_the_reason_a_flag_is_refused():
    lines = parser().format_help().splitlines()
    for action in parser()._actions:
        if action.option_strings:
            option = ", ".join(action.option_strings)
            mine = [line for line in lines if line.startswith(f"  {option} ") or line == f"  {option}"]
            assert len(mine) == 1, option
            assert mine[0].endswith(" ".join((action.help or "").split())), option
    for flag in TABLE.values():
        if flag.status == "refused" and flag.name not in FIELDS:
            line = next(line for line in lines if line.startswith(f"  --{flag.name} "))
            assert line.endswith(flag.line) and "not supported" in line, line


def _filled_gui_config(path: Path, tmp_path: Path) -> Path:
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    filled = tmp_path / path.name
    filled.write_text(text)
    return filled


def _exported_flags(command: str) -> dict[str, object]:
    """The flags of an exported command as kohya's argparse reads them (the given ones only)."""
    from engine.kohya_command import command_to_argv

    ns, unknown = parser().parse_known_args(command_to_argv(command))
    assert unknown == []
    return {name: value for name, value in vars(ns).items() if value is not None and name not in ("config", "headless")}


OWN_COMMANDS = {
    "shell file": COMMAND,
    "reference job": ("accelerate launch train_network.py --pretrained_model_name_or_path=/m/any.safetensors "
                      "--dataset_config=d.toml --output_dir=out/ --output_name=spyke_plasma_v1 "
                      "--save_model_as=safetensors --save_every_n_steps=200 --max_train_epochs=4 --learning_rate=1e-4 "
                      "--unet_lr=1e-4 --text_encoder_lr=5e-5 --lr_scheduler=cosine --lr_warmup_steps=0 "
                      "--network_module=networks.lora --network_dim=32 --network_alpha=16 --mixed_precision=no "
                      "--save_precision=float --optimizer_type=AdamW --no_half_vae --clip_skip=2 "
                      "--prior_loss_weight=1.0 --max_data_loader_n_workers=1 --persistent_data_loader_workers "
                      "--gradient_checkpointing --seed=42"),
    "lycoris with lists and spaces": ("python train_network.py --pretrained_model_name_or_path '/m/my model' "
                                      "--train_data_dir=/d --network_module lycoris.kohya --network_args algo=lokr "
                                      "preset=full factor=8 --caption_extension '' --caption_prefix 'a photo of' "
                                      "--max_token_length 225 --lr_warmup_steps 10% --optimizer_args "
                                      "weight_decay=0.1 --resolution 768,512 --text_encoder_lr 1e-4 1e-4"),
}


@pytest.mark.parametrize("name", sorted(OWN_COMMANDS))
def test_export_of_an_imported_command_is_minimal_and_parses_back_to_the_same_config(name, tmp_path):
    from engine.kohya_config import at_kohya_default
    from engine.kohya_command import command_to_argv

    config = parse(command_to_argv(OWN_COMMANDS[name]))
    preset = tmp_path / "p.toml"
    preset.write_text(import_kohya(OWN_COMMANDS[name])[0])
    command = export_kohya(str(preset))
    assert parse(command_to_argv(command)) == config
    for flag, value in _exported_flags(command).items():          # each one says something kohya would not do
        assert not at_kohya_default(flag, coerce_value(flag, value, flag)), flag


def test_export_names_the_flags_kohya_has_no_default_for_and_leaves_out_kohyas_defaults(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\nmax_token_length = 75\n'
                      'optimizer_type = "AdamW"\nmax_train_steps = 1600\nsave_model_as = "safetensors"\n'
                      'caption_extension = ""\n')
    flags = _exported_flags(export_kohya(str(preset)))
    assert flags == {"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "resolution": "512",
                     "network_module": "networks.lora", "output_dir": "output", "caption_extension": ""}


def test_export_never_prints_the_wandb_api_key(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('wandb_api_key = "SECRET"\nlog_with = "wandb"\nnetwork_dim = 8\n')
    command = export_kohya(str(preset))
    assert "SECRET" not in command and "--log_with=wandb" in command and "--network_dim=8" in command
    assert command.splitlines()[-1].startswith("# --wandb_api_key left out: a secret")


@pytest.mark.skipif(not GUI_CONFIGS.is_dir(), reason="the kohya_ss GUI configs are not beside this checkout")
@pytest.mark.parametrize("path", gui_configs(), ids=lambda p: p.name.split(".")[0])
def test_export_of_a_gui_config_file_is_minimal_and_parses_back_to_the_same_config(path, tmp_path):
    from engine.kohya_config import at_kohya_default
    from engine.kohya_command import command_to_argv

    filled = _filled_gui_config(path, tmp_path)
    config = parse([f"--config_file={filled}"])
    command = export_kohya(str(filled))
    assert "--max_token_length" not in command and "--config_file" not in command
    assert parse(command_to_argv(command)) == config
    for flag, value in _exported_flags(command).items():
        assert not at_kohya_default(flag, coerce_value(flag, value, flag)), flag


@pytest.mark.skipif(not GUI_CONFIGS.is_dir(), reason="the kohya_ss GUI configs are not beside this checkout")
@pytest.mark.parametrize("path", gui_configs()[:4], ids=lambda p: p.name.split(".")[0])
def test_output_config_of_a_gui_config_file_is_a_config_file_that_reads_back_the_same(path, tmp_path):
    from engine.kohya_command import command_to_argv

    filled = _filled_gui_config(path, tmp_path)
    argv = command_to_argv(export_kohya(str(filled))) + ["--wandb_api_key=SECRET"]
    written = tmp_path / "written.toml"
    with pytest.raises(SystemExit):
        parse([f"--config_file={written}", "--output_config", *argv])
    doc = read_toml(written)
    assert not {"wandb_api_key", "config_file", "output_config", "max_token_length"} & set(doc)
    assert parse([f"--config_file={written}"]) == parse([f"--config_file={filled}"])


@pytest.mark.parametrize("flag, fix", [("--epoch=10", "--max_train_epochs"), ("--noise_offset_type=Original",
                                                                          "--noise_offset")])
def test_a_gui_only_key_is_ignored_in_a_config_file_but_refused_on_the_command_line(tmp_path, flag, fix):
    name, value = flag[2:].split("=")
    cfg_file = tmp_path / "k.toml"
    cfg_file.write_text(f'[basic]\n{name} = "{value}"\n')
    notes: list[str] = []
    parse_train_args(parser(), [f"--config_file={cfg_file}"], notes=notes)
    assert any(line.startswith(f"{name}: ") and "sd-scripts ignores it" in line for line in notes)
    with pytest.raises(ConfigError, match=rf"^--{name}: not a train_network\.py flag .*; use {fix}"):
        parse_train_args(parser(), [flag], notes=[])
    assert "config files only: " in next(line for line in parser().format_help().splitlines()
                                         if line.startswith(f"  --{name} "))
