"""kohya's logging flags: TensorBoard event files with kohya's tags, wandb offline, export-tensorboard."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from engine.cli_args import make_parser, parse_train_args
from engine.config_io import build_config
from engine.demo import prepare_demo
from engine.errors import ConfigError
from engine.events import StepCompleted
from engine.run.journal import read_events
from engine.tiny import generate_dataset
from engine.trackers import d_lr_kind, kohya_lr_logs

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS_PER_EPOCH = 4   # 4 images, batch 1, 1 repeat


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)


def make_config(tiny_cache, small, out: Path, **overrides):
    values = dict(dataset_config=str(small.dataset_toml), resolution="64", max_train_epochs=None, max_train_steps=5,
                  save_every_n_steps=None, save_every_n_epochs=None, save_state=False, output_name="lora",
                  network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=5e-4,
                  lr_scheduler="constant_with_warmup", lr_warmup_steps=3, seed=7)
    values.update(overrides)
    return prepare_demo(root=tiny_cache, output_root=out, **values)


def run(config) -> tuple[str, list]:
    from engine.headless import run_headless

    out = io.StringIO()
    assert run_headless(config, out=out) == 0, out.getvalue()
    [journal] = Path(config.output_dir).glob(".spyke/*/events.jsonl")
    return out.getvalue(), read_events(journal)


def scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged_run(tiny_cache, small, tmp_path_factory):
    """Five steps (one epoch and a bit) logged live to TensorBoard; its events and its log folder."""
    base = tmp_path_factory.mktemp("logged")
    tracker_toml = base / "trackers.toml"
    tracker_toml.write_text('[tensorboard]\nfilename_suffix = ".kohya"\n')
    config = make_config(tiny_cache, small, base / "out", logging_dir=str(base / "logs"), log_with="tensorboard",
                         log_tracker_config=str(tracker_toml))
    _, events = run(config)
    return {"events": events, "logs": base / "logs", "run_dir": next((Path(config.output_dir) / ".spyke").iterdir()),
            "base": base}


def test_tensorboard_holds_kohyas_tags_with_the_runs_losses_and_learning_rates(logged_run):
    steps = [e for e in logged_run["events"] if isinstance(e, StepCompleted)]
    [folder] = [p.parent for p in logged_run["logs"].glob("*/network_train/events.out.tfevents.*.kohya")]
    got = scalars(folder)
    assert set(got) == {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "lr/group1",
                        "loss/epoch_average"}
    losses = [e.loss for e in steps]
    assert [(s, v) for s, v, _ in got["loss/current"]] == [(e.step, pytest.approx(e.loss, rel=1e-6)) for e in steps]
    # kohya's moving average: the mean of the last epoch's worth of step losses
    window = [losses[max(0, i + 1 - STEPS_PER_EPOCH):i + 1] for i in range(len(losses))]
    assert [v for _, v, _ in got["loss/average"]] == [pytest.approx(sum(w) / len(w), rel=1e-6) for w in window]
    assert [(s, v) for s, v, _ in got["loss/epoch_average"]] == [
        (1, pytest.approx(sum(losses[:4]) / 4, rel=1e-6)), (2, pytest.approx(sum(losses[1:5]) / 4, rel=1e-6))]
    # kohya logs get_last_lr() after the schedule's step: at step k the warm-up's k/3 (the next step's rate)
    warmup = [min(1.0, e.step / 3) for e in steps]
    for tag, lr in (("lr/unet", 1e-3), ("lr/group1", 1e-3), ("lr/textencoder", 5e-4)):
        assert [v for _, v, _ in got[tag]] == [pytest.approx(lr * w, rel=1e-6) for w in warmup]
    assert [e.lrs["unet"] for e in steps[:3]] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3])  # the rates trained with


def test_log_folder_is_logging_dir_prefix_timestamp_and_tracker_name(tiny_cache, small, tmp_path, logged_run):
    [stamped] = logged_run["logs"].iterdir()
    assert re.fullmatch(r"\d{14}", stamped.name) and [p.name for p in stamped.iterdir()] == ["network_train"]
    config = make_config(tiny_cache, small, tmp_path / "out", max_train_steps=1, logging_dir=str(tmp_path / "logs"),
                         log_prefix="plasma-", log_tracker_name="my_lora")
    run(config)  # --logging_dir alone means TensorBoard, as in kohya
    [stamped] = (tmp_path / "logs").iterdir()
    assert re.fullmatch(r"plasma-\d{14}", stamped.name)
    assert list((stamped / "my_lora").glob("events.out.tfevents.*"))


def test_export_tensorboard_writes_the_scalars_live_logging_wrote(logged_run, capsys):
    from cockpit.cli import main

    target = logged_run["base"] / "exported"
    assert main(["export-tensorboard", str(logged_run["run_dir"]), "--logging_dir", str(target)]) == 0
    printed = capsys.readouterr().out
    [live] = [p.parent for p in logged_run["logs"].glob("*/network_train/events.out.tfevents.*")]
    [exported] = [p.parent for p in target.glob("*/network_train/events.out.tfevents.*")]
    assert f"wrote TensorBoard events to {exported}" in printed
    assert exported.relative_to(target) == live.relative_to(logged_run["logs"])
    assert scalars(exported) == scalars(live)


def test_export_tensorboard_into_a_folder_that_has_the_runs_events_is_refused(logged_run, capsys):
    from cockpit.cli import main

    before = sorted(p.name for p in logged_run["logs"].rglob("*"))
    assert main(["export-tensorboard", str(logged_run["run_dir"]), "--logging_dir", str(logged_run["logs"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds TensorBoard events for this run" in err[0]
    assert "pass --logging_dir=OTHER_DIR" in err[0]
    assert sorted(p.name for p in logged_run["logs"].rglob("*")) == before


def test_export_tensorboard_of_a_run_without_logging_writes_beside_its_checkpoints(tiny_cache, small, tmp_path):
    from engine.api import export_tensorboard

    config = make_config(tiny_cache, small, tmp_path / "out", max_train_steps=2)
    run(config)
    assert not (Path(config.output_dir) / "logs").exists()
    [run_dir] = (Path(config.output_dir) / ".spyke").iterdir()
    export_tensorboard(str(run_dir))
    [folder] = [p.parent for p in (Path(config.output_dir) / "logs").glob("*/network_train/events.out.tfevents.*")]
    assert [s for s, _, _ in scalars(folder)["loss/current"]] == [1, 2]


def test_wandb_logs_offline_when_there_is_no_network_and_keeps_the_key_out_of_the_run_folder(
        tiny_cache, small, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import engine.trackers

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setattr(engine.trackers, "reachable", lambda host, *a, **k: False)
    config = make_config(tiny_cache, small, tmp_path / "out", max_train_steps=2, log_with="wandb",
                         logging_dir=str(tmp_path / "logs"), wandb_run_name="plasma", wandb_api_key="secret-key-123",
                         log_config=True)
    printed, _ = run(config)
    line = next(x for x in printed.splitlines() if x.startswith("wandb:"))
    assert line.startswith("wandb: no network (api.wandb.ai unreachable): logging offline to ")
    [stamped] = (tmp_path / "logs").iterdir()
    [offline] = (stamped / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb")) and str(offline) in line
    assert not list(stamped.glob("network_train"))  # wandb only: no TensorBoard folder
    run_dir = next((Path(config.output_dir) / ".spyke").iterdir())
    for written in [*run_dir.rglob("*"), *stamped.rglob("*")]:
        if written.is_file():
            assert b"secret-key-123" not in written.read_bytes(), written
    # --log_config: the settings are the wandb run's config, paths left out as in kohya
    [log] = offline.glob("run-*.wandb")
    stored = wandb_config(log)
    assert stored["network_dim"] == 4 and stored["wandb_run_name"] == "plasma" and stored["max_train_epochs"] is None
    assert "output_dir" not in stored and "wandb_api_key" not in stored and "logging_dir" not in stored


def hparams(folder: Path) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def test_log_config_stores_the_settings_as_tensorboard_hparams_without_paths_or_the_api_key(tiny_cache, small,
                                                                                             tmp_path):
    import yaml

    config = make_config(tiny_cache, small, tmp_path / "out", max_train_steps=1, logging_dir=str(tmp_path / "logs"),
                         log_config=True, wandb_api_key="secret-key-123", network_args=["conv_dim=2"],
                         vae="", training_comment="plasma")
    run(config)
    [tracker] = (tmp_path / "logs").glob("*/network_train")
    [folder] = [p for p in tracker.iterdir() if p.is_dir()]
    got = hparams(folder)
    assert got["network_dim"] == 4 and got["learning_rate"] == pytest.approx(config.learning_rate)
    assert got["optimizer_type"] == "AdamW" and got["log_config"] == 1 and got["training_comment"] == "plasma"
    assert got["network_args"] == "['conv_dim=2']"   # kohya: lists as their text
    assert "max_train_epochs" not in got             # None: TensorBoard's hparams skip it
    for secret in ("wandb_api_key", "pretrained_model_name_or_path", "output_dir", "logging_dir", "vae",
                   "train_data_dir", "reg_data_dir"):
        assert secret not in got
    stored = yaml.safe_load((folder / "hparams.yml").read_text())
    assert stored["network_dim"] == 4 and stored["max_train_epochs"] is None and "wandb_api_key" not in stored
    for written in (tmp_path / "logs").rglob("*"):
        assert not written.is_file() or b"secret-key-123" not in written.read_bytes()
    # without --log_config no hparams are stored
    config = make_config(tiny_cache, small, tmp_path / "out2", max_train_steps=1, logging_dir=str(tmp_path / "l2"))
    run(config)
    [tracker] = (tmp_path / "l2").glob("*/network_train")
    assert not [p for p in tracker.iterdir() if p.is_dir()]


def wandb_records(data: bytes):
    """The protobuf records of a wandb transaction log (a LevelDB-style log of 32 KiB blocks after a 7-byte
    header; each chunk: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_config(log: Path, timeout: float = 60.0) -> dict:
    """The config a finished offline wandb run recorded (waits for its exit record: wandb writes it last)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(log.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.05)   # polling the file wandb's service is still writing
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def test_lr_tags_follow_kohyas_group_naming():
    assert kohya_lr_logs({"unet": 1e-3, "text_encoder": 5e-4}, unet_only=False) == {
        "lr/textencoder": 5e-4, "lr/unet": 1e-3, "lr/group1": 1e-3}
    assert kohya_lr_logs({"unet": 1e-3}, unet_only=True) == {"lr/unet": 1e-3, "lr/group0": 1e-3}
    assert kohya_lr_logs({"text_encoder": 5e-4}, unet_only=False) == {"lr/textencoder": 5e-4}
    # a frozen text encoder without --network_train_unet_only: kohya's `else` names the first group textencoder
    assert kohya_lr_logs({"unet": 1e-3}, unet_only=False) == {"lr/unet": 1e-3, "lr/textencoder": 1e-3}


def test_block_and_loraplus_groups_get_kohyas_descriptions_and_group_indices():
    lrs = {"unet_block0": 1e-3, "unet_block0 plus": 16e-3, "unet_block5": 5e-4, "text_encoder": 2e-4,
           "text_encoder plus": 32e-4}
    assert kohya_lr_logs(lrs, unet_only=False) == {
        "lr/textencoder": 2e-4, "lr/textencoder plus": 32e-4, "lr/unet_block0": 1e-3, "lr/unet_block0 plus": 16e-3,
        "lr/unet_block5": 5e-4, "lr/group1": 32e-4, "lr/group2": 1e-3, "lr/group3": 16e-3, "lr/group4": 5e-4}


def test_dylora_groups_carry_no_descriptions_so_kohya_names_them_by_index():
    # networks.dylora returns no descriptions: kohya's loop names groups unet (two or fewer) or group<i+1>
    assert kohya_lr_logs({"unet": 1e-3, "text_encoder": 5e-4}, unet_only=False, described=False) == {
        "lr/unet": 1e-3, "lr/textencoder": 5e-4, "lr/group1": 1e-3}
    lrs = {"unet": 1.0, "unet plus": 2.0, "text_encoder": 3.0, "text_encoder plus": 4.0}
    assert kohya_lr_logs(lrs, unet_only=False, described=False) == {
        "lr/textencoder": 3.0, "lr/group1": 4.0, "lr/group2": 1.0, "lr/group3": 2.0, "lr/group4": 2.0}


@pytest.mark.parametrize("name,kind", [("Prodigy", "dadapt"), ("prodigy", "dadapt"), ("DAdaptAdam", "dadapt"),
                                       ("DAdaptation", "dadapt"), ("AdamW", ""), ("prodigyopt.Prodigy", ""),
                                       ("prodigyplus.ProdigyPlusScheduleFree", "prodigyplus")])
def test_d_lr_tags_follow_kohyas_optimizer_name_rule(name, kind):
    assert d_lr_kind(name) == kind


def test_prodigy_plus_schedule_free_logs_the_first_groups_d_lr_untagged():
    logs = kohya_lr_logs({"unet": 1.0, "text_encoder": 1.0}, unet_only=False, d_lrs={"unet": 0.5, "text_encoder": 0.25},
                         d_kind="prodigyplus")
    assert logs == {"lr/textencoder": 1.0, "lr/unet": 1.0, "lr/group1": 1.0, "lr/d*lr": 0.25,
                    "lr/d*lr/group1": 0.5}


@pytest.mark.parametrize("optimizer", ["Prodigy", "DAdaptAdam"])
def test_adaptive_optimizers_log_kohyas_d_lr_tags_from_the_optimizers_param_groups(tiny_cache, small, tmp_path,
                                                                                   optimizer):
    from engine.state import load_state

    config = make_config(tiny_cache, small, tmp_path / "out", max_train_steps=3, optimizer_type=optimizer,
                         learning_rate=1.0, unet_lr=1.0, text_encoder_lr=1.0, lr_warmup_steps=2,
                         save_every_n_steps=1, save_state=True, logging_dir=str(tmp_path / "logs"))
    run(config)
    [folder] = [p.parent for p in (tmp_path / "logs").glob("*/network_train/events.out.tfevents.*")]
    got = scalars(folder)
    assert {"lr/d*lr/textencoder", "lr/d*lr/unet", "lr/d*lr/group1"} <= set(got)
    # the state saved at step k holds the optimizer as kohya reads it when logging step k
    for step in (1, 2, 3):
        groups = load_state(Path(config.output_dir) / f"lora-step{step:08d}-state").optimizer_state["param_groups"]
        unet, text_encoder = groups   # the engine's order: U-Net first
        for tag, group in (("lr/d*lr/unet", unet), ("lr/d*lr/group1", unet), ("lr/d*lr/textencoder", text_encoder),
                           ("lr/unet", unet), ("lr/textencoder", text_encoder)):
            value = group["d"] * group["lr"] if "d*lr" in tag else group["lr"]
            assert dict((s, v) for s, v, _ in got[tag])[step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert [v for _, v, _ in got["lr/unet"]] == pytest.approx([0.5, 1.0, 1.0])   # the warm-up's next rates
    assert len({v for _, v, _ in got["lr/d*lr/unet"]}) > 1   # d adapts (Prodigy grows it from d0)


def test_logging_flags_parse_from_the_command_line_and_a_preset(tmp_path):
    parser = make_parser("spyke-cockpit train", "")
    _, config = parse_train_args(parser, ["--logging_dir", "logs", "--log_with=all", "--log_prefix", "a-",
                                          "--log_tracker_name", "t", "--wandb_run_name", "my run"])
    assert (config.logging_dir, config.log_with, config.log_prefix, config.log_tracker_name,
            config.wandb_run_name) == ("logs", "all", "a-", "t", "my run")
    preset = tmp_path / "p.toml"
    preset.write_text('[logging]\nlogging_dir = "logs"\nlog_with = "wandb"\nwandb_api_key = "k"\n')
    config = build_config(preset)
    assert (config.logging_dir, config.log_with, config.wandb_api_key) == ("logs", "wandb", "k")


def test_log_with_tensorboard_without_logging_dir_is_one_line(capsys):
    from cockpit.cli import main

    assert main(["train", "--headless", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                 "--log_with", "tensorboard"]) == 2
    assert capsys.readouterr().err == ("spyke-cockpit: error: --log_with tensorboard writes TensorBoard logs and "
                                       "needs --logging_dir=DIR (kohya: logging_dir is required when log_with is "
                                       "tensorboard)\n")


@pytest.mark.parametrize("flag,value,message", [
    ("log_with", "comet", "--log_with must be one of tensorboard, wandb, all (got 'comet')"),
    ("log_tracker_config", "missing.toml", "--log_tracker_config missing.toml: file not found"),
])
def test_bad_logging_flag_names_the_flag(flag, value, message):
    config = build_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "d", flag: value})
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert str(err.value) == message


def test_unknown_tensorboard_option_in_tracker_config_is_refused(tmp_path):
    bad = tmp_path / "trackers.toml"
    bad.write_text("[tensorboard]\nlogdir = 'x'\n")
    config = build_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                 "logging_dir": "logs", "log_tracker_config": str(bad)})
    with pytest.raises(ConfigError, match=r"\[tensorboard\] logdir is not a TensorBoard writer option"):
        config.validate()
