"""The training engine end to end on the tiny model: step math, files, metadata,
reproducibility, kohya semantics, control (pause/resume/save/abort) and events.

Runs are a few steps at 64 px on a 4-image dataset; every run shares one tiny model.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.config_io import build_config
from engine.demo import prepare_demo
from engine.events import (
    CheckpointSaved,
    PhaseChanged,
    RunFinished,
    RunStarted,
    StepCompleted,
)
from engine.plan import plan_run
from engine.run.journal import EventTail, read_events
from engine.tiny import generate_dataset

REPO = Path(__file__).resolve().parent.parent
REFERENCE_PRESET = REPO / "configs" / "spyke_plasma_v1.toml"
NAME = "spyke_plasma_v1"

KOHYA_METADATA_KEYS = """ss_session_id ss_training_started_at ss_training_finished_at ss_output_name ss_sd_model_name
ss_base_model_version ss_v2 ss_network_module ss_network_dim ss_network_alpha ss_learning_rate ss_unet_lr
ss_text_encoder_lr ss_lr_scheduler ss_lr_warmup_steps ss_optimizer ss_max_grad_norm ss_num_train_images
ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs ss_max_train_steps ss_steps ss_epoch
ss_gradient_checkpointing ss_mixed_precision ss_clip_skip ss_seed ss_cache_latents ss_prior_loss_weight
ss_noise_offset ss_min_snr_gamma ss_dataset_dirs ss_tag_frequency ss_new_sd_model_hash sshs_model_hash
modelspec.sai_model_spec modelspec.architecture modelspec.implementation modelspec.implementation_version
modelspec.title modelspec.resolution
modelspec.date modelspec.prediction_type modelspec.encoder_layer""".split()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def assets(tmp_path_factory, tiny_cache):
    """The tiny model (built once) and a 4-image 64 px dataset (1 repeat: 4 steps per epoch)."""
    root = tiny_cache
    small = generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)
    return {"root": root, "model": root / "tiny-sd15", "small": small}


def make_config(assets, out: Path, **overrides):
    """The demo preset (seed flags scaled down) on the small dataset, a few steps, no saves unless asked."""
    values = dict(dataset_config=str(assets["small"].dataset_toml), resolution="64", max_train_epochs=None,
                  max_train_steps=3, save_every_n_steps=None, save_state=False, output_name=NAME, network_dim=4,
                  network_alpha=2.0)
    values.update(overrides)
    return prepare_demo(root=assets["root"], output_root=out, **values)


def train(cfg, **kwargs):
    from engine.trainer import Trainer

    events: list = []
    result = Trainer(cfg, sinks=[events.append], **kwargs).run()
    return result, events


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def read(path: Path):
    from engine.checkpoint import read_lora_file

    return read_lora_file(path)


# ----------------------------------------------------------------------------- step math (no torch)
@pytest.fixture(scope="module")
def seed_dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("seed23"), num_images=23, num_repeats=10, resolution=64)


def seed_config(ds, **overrides):
    paths = {"pretrained_model_name_or_path": "unused", "dataset_config": str(ds.dataset_toml),
             "output_dir": str(ds.root / "out")}
    return build_config(REFERENCE_PRESET, {**paths, **overrides})


def test_seed_step_math_and_checkpoint_names(seed_dataset):
    assert seed_dataset.image_dir.name == "10_spyke"
    plan = plan_run(seed_config(seed_dataset))
    assert plan.batches_per_epoch == 230 and plan.steps_per_epoch == 230
    assert plan.num_epochs == 4 and plan.total_steps == 920
    assert [(c.step, c.kind, c.filename) for c in plan.checkpoints] == [
        (200, "step", f"{NAME}-step00000200.safetensors"),
        (400, "step", f"{NAME}-step00000400.safetensors"),
        (600, "step", f"{NAME}-step00000600.safetensors"),
        (800, "step", f"{NAME}-step00000800.safetensors"),
        (920, "final", f"{NAME}.safetensors"),
    ]
    # the same run from the folder convention (--train_data_dir with 10_spyke)
    plan2 = plan_run(seed_config(seed_dataset, dataset_config="", train_data_dir=str(seed_dataset.image_dir.parent)))
    assert plan2.total_steps == 920 and plan2.dataset.num_train_images == 230


def test_max_train_epochs_overrides_steps_and_steps_alone(seed_dataset):
    assert plan_run(seed_config(seed_dataset, max_train_steps=5)).total_steps == 920
    plan = plan_run(seed_config(seed_dataset, max_train_epochs=None, max_train_steps=500))
    assert plan.total_steps == 500 and plan.num_epochs == 3
    assert [c.step for c in plan.checkpoints] == [200, 400, 500]


def test_epoch_save_names_not_for_last_epoch(seed_dataset):
    plan = plan_run(seed_config(seed_dataset, save_every_n_steps=None, save_every_n_epochs=1))
    assert [(c.step, c.epoch, c.kind, c.filename) for c in plan.checkpoints] == [
        (230, 1, "epoch", f"{NAME}-000001.safetensors"),
        (460, 2, "epoch", f"{NAME}-000002.safetensors"),
        (690, 3, "epoch", f"{NAME}-000003.safetensors"),
        (920, 4, "final", f"{NAME}.safetensors"),
    ]
    plan = plan_run(seed_config(seed_dataset, save_every_n_steps=None, save_every_n_epochs=2))
    assert [c.filename for c in plan.checkpoints] == [f"{NAME}-000002.safetensors", f"{NAME}.safetensors"]


def test_bucketed_step_math(tmp_path):
    # 3 wide + 1 tall + 1 square image, batch 2: buckets are batched separately (kohya),
    # so 2 + 1 + 1 = 4 batches per epoch, not ceil(5 / 2) = 3.
    ds = generate_dataset(tmp_path / "b", num_images=5, num_repeats=1,
                          sizes=[(384, 128), (384, 128), (384, 128), (128, 384), (128, 128)])
    toml = tmp_path / "bucket.toml"
    toml.write_text(
        "[general]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\nbucket_reso_steps = 64\n"
        f"[[datasets]]\nresolution = 128\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = {json.dumps(str(ds.image_dir))}\n"
        "num_repeats = 1\n")
    cfg = seed_config(ds, dataset_config=str(toml), max_train_epochs=3, save_every_n_steps=5)
    plan = plan_run(cfg)
    buckets: dict = {}
    for e in plan.dataset.entries:
        buckets[e.bucket] = buckets.get(e.bucket, 0) + e.num_repeats
    assert len(buckets) == 3
    assert all(w * h <= 128 * 128 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert plan.batches_per_epoch == sum(math.ceil(n / 2) for n in buckets.values()) == 4
    assert plan.total_steps == 12
    assert [(c.step, c.kind) for c in plan.checkpoints] == [(5, "step"), (10, "step"), (12, "final")]
    # every batch of an epoch holds samples of one bucket only
    for batch in plan.dataset.epoch_batches(0, 42):
        assert len({plan.dataset.entries[plan.dataset.sample_to_entry(s)].bucket for s in batch}) == 1


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def main_run(assets, tmp_path_factory):
    """8 steps over 2 epochs with step, epoch and final saves (seed flags: clip_skip 2, cosine, seed 42…)."""
    out = tmp_path_factory.mktemp("main_run")
    cfg = make_config(assets, out, max_train_epochs=2, save_every_n_steps=3, save_every_n_epochs=1, seed=42,
                      network_dim=8, network_alpha=4.0)
    result, events = train(cfg)
    assert result.status == "completed", result.error
    return cfg, result, events


def test_run_writes_exactly_the_kohya_file_names(main_run):
    cfg, result, events = main_run
    out = Path(cfg.output_dir)
    assert result.global_step == 8
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted([
        f"{NAME}-step00000003.safetensors", f"{NAME}-000001.safetensors", f"{NAME}-step00000006.safetensors",
        f"{NAME}.safetensors"])          # no -000002: the last epoch's file is the final one
    assert result.final_path == out / f"{NAME}.safetensors"
    assert [(e.kind, e.step, Path(e.path).name) for e in of(events, CheckpointSaved)] == [
        ("step", 3, f"{NAME}-step00000003.safetensors"), ("epoch", 4, f"{NAME}-000001.safetensors"),
        ("step", 6, f"{NAME}-step00000006.safetensors"), ("final", 8, f"{NAME}.safetensors")]
    assert all(e.bytes == Path(e.path).stat().st_size for e in of(events, CheckpointSaved))
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.safetensors*"))



def test_a_step_file_and_an_epoch_file_due_at_the_same_step_are_both_saved_step_first(assets, tmp_path):
    cfg = make_config(assets, tmp_path, max_train_epochs=2, save_every_n_steps=4, save_every_n_epochs=1, seed=1,
                      network_dim=4, network_alpha=2.0)
    result, events = train(cfg)
    assert result.status == "completed", result.error
    planned = [(c.kind, c.step, c.filename) for c in plan_run(cfg).checkpoints]
    saved = [(e.kind, e.step, Path(e.path).name) for e in of(events, CheckpointSaved)]
    assert saved == planned == [
        ("step", 4, f"{NAME}-step00000004.safetensors"), ("epoch", 4, f"{NAME}-000001.safetensors"),
        ("step", 8, f"{NAME}-step00000008.safetensors"), ("final", 8, f"{NAME}.safetensors")]

def test_the_final_file_carries_every_kohya_metadata_key(main_run):
    cfg, result, _ = main_run
    tensors, meta = read(result.final_path)
    missing = [k for k in KOHYA_METADATA_KEYS if k not in meta]
    assert missing == []
    assert all(isinstance(v, str) for v in meta.values())
    expect = {
        "ss_output_name": NAME, "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
        "ss_steps": "8", "ss_epoch": "2", "ss_num_epochs": "2", "ss_max_train_steps": "8",
        "ss_num_batches_per_epoch": "4", "ss_num_train_images": "4", "ss_num_reg_images": "0",
        "ss_seed": "42", "ss_clip_skip": "2", "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "0",
        "ss_gradient_checkpointing": "True", "ss_mixed_precision": "no", "ss_cache_latents": "False",
        "ss_prior_loss_weight": "1.0", "ss_max_grad_norm": "1.0", "ss_session_id": result.run_dir.name,
        "ss_resize_interpolation": "None",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": NAME,
        "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "2",
    }
    assert {k: meta[k] for k in expect} == expect
    assert float(meta["ss_unet_lr"]) == 1e-4 and float(meta["ss_text_encoder_lr"]) == 5e-5
    assert float(meta["ss_learning_rate"]) == 1e-4
    assert "AdamW" in meta["ss_optimizer"]
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert list(dirs.values()) == [{"n_repeats": 1, "img_count": 4}]
    tags = json.loads(meta["ss_tag_frequency"])
    assert sum(next(iter(tags.values())).values()) >= 4 and "spyke" in next(iter(tags.values()))
    assert len(meta["sshs_model_hash"]) == 64   # ss_new_sd_model_hash: file bases only (this is a folder)
    # an intermediate file records its own step and epoch
    _, step_meta = read(Path(cfg.output_dir) / f"{NAME}-step00000003.safetensors")
    assert (step_meta["ss_steps"], step_meta["ss_epoch"]) == ("3", "1")
    _, epoch_meta = read(Path(cfg.output_dir) / f"{NAME}-000001.safetensors")
    assert (epoch_meta["ss_steps"], epoch_meta["ss_epoch"]) == ("4", "1")


# ----------------------------------------------------------------------------- truthful dataset metadata
# kohya leaves these out when --dataset_config is given (each dataset has its own, in ss_datasets)
FLAT_DATASET_KEYS = """ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug
ss_random_crop ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso
ss_keep_tokens ss_caption_extension ss_reg_dataset_dirs ss_bucket_info""".split()


def _two_bucket_images(root: Path, caption_ext: str):
    """4 images in two buckets at 128 px (square and 8:3), captions written with ``caption_ext``."""
    ds = generate_dataset(root, num_images=4, num_repeats=1, resolution=128, seed=5,
                          sizes=[(128, 128), (256, 96)])
    for cap in ds.image_dir.glob("*.caption"):
        cap.rename(cap.with_suffix(caption_ext))
    return ds


def test_dataset_toml_run_writes_ss_datasets_and_leaves_out_flat_dataset_keys(assets, tmp_path):
    import io

    from engine.events import NetworkBuilt
    from engine.headless import ProgressPrinter
    from engine.trainer import Trainer

    ds = _two_bucket_images(tmp_path / "data", ".txt")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\nshuffle_caption = true\nkeep_tokens = 1\nflip_aug = true\n'
        "[[datasets]]\nresolution = 128\nbatch_size = 2\nenable_bucket = true\n"
        "min_bucket_reso = 64\nmax_bucket_reso = 256\n"
        f"[[datasets.subsets]]\nimage_dir = {json.dumps(str(ds.image_dir))}\nclass_tokens = \"spyke\"\n")
    # the command line says 64 px, batch 1, .caption, no buckets: none of it is what trains
    cfg = make_config(assets, tmp_path / "out", dataset_config=str(toml), resolution="64", max_train_steps=1,
                      gradient_accumulation_steps=1)
    printed = io.StringIO()
    events: list = []
    result = Trainer(cfg, sinks=[events.append, ProgressPrinter(printed)]).run()
    assert result.status == "completed", result.error
    tensors, meta = read(result.final_path)

    assert [k for k in FLAT_DATASET_KEYS if k in meta] == []
    (dataset,) = json.loads(meta["ss_datasets"])
    assert {k: dataset[k] for k in ("is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images",
                                    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso")} == {
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 4, "num_reg_images": 0,
        "resolution": [128, 128], "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256}
    assert dataset["bucket_info"]["buckets"] == {"0": {"resolution": [128, 128], "count": 2},
                                                 "1": {"resolution": [192, 64], "count": 2}}
    (subset,) = dataset["subsets"]
    assert {k: subset[k] for k in ("image_dir", "img_count", "num_repeats", "flip_aug", "shuffle_caption",
                                   "keep_tokens", "class_tokens", "is_reg", "caption_extension", "color_aug",
                                   "random_crop")} == {
        "image_dir": "1_spyke", "img_count": 4, "num_repeats": 1, "flip_aug": True, "shuffle_caption": True,
        "keep_tokens": 1, "class_tokens": "spyke", "is_reg": False, "caption_extension": ".txt",
        "color_aug": False, "random_crop": False}
    # the .txt captions were read: more words than the class token, in the per-dataset and merged counts
    assert len(dataset["tag_frequency"]["1_spyke"]) > 1
    assert json.loads(meta["ss_tag_frequency"]) == dataset["tag_frequency"]
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_spyke": {"n_repeats": 1, "img_count": 4}}
    assert meta["modelspec.resolution"] == "128x128"

    # headless start-up names what was built, counted as the file holds it
    (built,) = of(events, NetworkBuilt)
    unet_n = sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    te_n = sum(k.startswith("lora_te_") and k.endswith(".lora_down.weight") for k in tensors)
    assert (built.unet_modules, built.text_encoder_modules) == (unet_n, te_n) and unet_n > 0 and te_n > 0
    line = f"LoRA: {unet_n} U-Net modules, {te_n} text-encoder modules, dim 4, alpha 2"
    assert line in printed.getvalue().splitlines()


def test_train_data_dir_run_writes_the_flat_keys_it_trained_with(assets, tmp_path):
    from engine.ldm_convert import write_ldm_single_file

    ds = _two_bucket_images(tmp_path / "data", ".caption")
    single = write_ldm_single_file(assets["model"], tmp_path / "tiny-sd15.safetensors")
    # 200 is not a multiple of bucket_reso_steps 64: the run rounds it up to 256
    cfg = make_config(assets, tmp_path / "out", dataset_config=None, train_data_dir=str(ds.image_dir.parent),
                      pretrained_model_name_or_path=str(single), sd_config_dir=str(assets["model"]),
                      resolution="128", train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=1,
                      enable_bucket=True, min_bucket_reso=64, max_bucket_reso=200, keep_tokens=1,
                      shuffle_caption=True)
    result, _ = train(cfg)
    assert result.status == "completed", result.error
    _, meta = read(result.final_path)
    expect = {
        "ss_batch_size_per_device": "2", "ss_total_batch_size": "4", "ss_resolution": "(128, 128)",
        "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False", "ss_min_bucket_reso": "64",
        "ss_max_bucket_reso": "256", "ss_keep_tokens": "1", "ss_shuffle_caption": "True", "ss_flip_aug": "False",
        "ss_color_aug": "False", "ss_random_crop": "False", "ss_caption_extension": ".caption",
        "ss_reg_dataset_dirs": "{}", "modelspec.resolution": "128x128",
    }
    assert {k: meta.get(k) for k in expect} == expect
    assert "ss_datasets" not in meta
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [128, 128], "count": 2},
                                                             "1": {"resolution": [192, 64], "count": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_spyke": {"n_repeats": 1, "img_count": 4}}
    # kohya's two base-model hashes of a single file: the legacy 8-hex one and the full sha256
    data = single.read_bytes()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()


def test_trained_lora_changed_and_alpha(main_run):
    cfg, result, _ = main_run
    tensors, _ = read(result.final_path)
    ups = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    assert any(k.startswith("lora_unet_") for k in ups) and any(k.startswith("lora_te_text_model_") for k in ups)
    # clip_skip=2: the text encoder's last layer (4 of 0..4) never runs, so its adapters get no gradient
    skipped = {k for k in ups if k.startswith("lora_te_text_model_encoder_layers_4_")}
    assert len(skipped) == 6 and all(torch.count_nonzero(ups[k]) == 0 for k in skipped)
    assert all(v.abs().max() > 0 for k, v in ups.items() if k not in skipped)   # everything else learnt
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == len(ups) and all(v.ndim == 0 and float(v) == 4.0 for v in alphas.values())
    assert all(v.dtype == torch.float32 for v in tensors.values())      # save_precision float
    # the step-3 file differs from the final one (training went on)
    early, _ = read(Path(cfg.output_dir) / f"{NAME}-step00000003.safetensors")
    assert any(not torch.equal(early[k], tensors[k]) for k in ups)


def test_lrs_per_group_follow_cosine_to_zero(main_run):
    _, _, events = main_run
    steps = of(events, StepCompleted)
    assert [e.step for e in steps] == list(range(1, 9))
    assert [e.epoch for e in steps] == [1] * 4 + [2] * 4
    n = 8
    for e in steps:
        factor = 0.5 * (1 + math.cos(math.pi * (e.step - 1) / n))
        assert set(e.lrs) == {"unet", "text_encoder"}
        assert e.lrs["unet"] == pytest.approx(1e-4 * factor, rel=1e-6, abs=1e-15)
        assert e.lrs["text_encoder"] == pytest.approx(5e-5 * factor, rel=1e-6, abs=1e-15)
    assert all(math.isfinite(e.loss) and e.loss > 0 for e in steps)


def test_cosine_scheduler_reaches_zero(assets, tmp_path):
    job = make_job(assets, tmp_path, max_train_steps=10, lr_scheduler="cosine")
    lrs = []
    for _ in range(10):
        job.optimizer.step()
        job.lr_scheduler.step()
        lrs.append([g["lr"] for g in job.optimizer.param_groups])
    assert lrs[-1] == [0.0, 0.0]
    assert all(a >= b for a, b in zip([l[0] for l in lrs], [l[0] for l in lrs][1:]))


def test_the_run_folder_holds_its_config_and_an_events_journal_from_start_to_finish(main_run):
    cfg, result, events = main_run
    run_dir = result.run_dir
    assert run_dir == Path(cfg.output_dir) / ".spyke" / run_dir.name
    assert (run_dir / "config.toml").exists()
    assert build_config(run_dir / "config.toml").network_dim == 8
    logged = read_events(run_dir / "events.jsonl")
    types = [e.type for e in logged]
    assert types[0] == "run_started" and types[-1] == "finished"
    assert {"run_started", "phase", "step", "memory", "checkpoint", "finished"} <= set(types)
    started = logged[0]
    assert isinstance(started, RunStarted)
    assert (started.total_steps, started.num_epochs, started.batches_per_epoch, started.seed) == (8, 2, 4, 42)
    assert started.checkpoint_steps == [3, 4, 6, 8] and started.config["network_dim"] == 8
    phases = [e.phase for e in logged if isinstance(e, PhaseChanged)]
    assert phases[0] == "loading" and "training" in phases and "saving" in phases and phases[-1] == "finished"
    assert [e.step for e in logged if isinstance(e, StepCompleted)] == list(range(1, 9))
    assert [e.loss for e in logged if isinstance(e, StepCompleted)] == result.losses
    fin = logged[-1]
    assert isinstance(fin, RunFinished) and fin.status == "completed" and fin.step == 8
    assert fin.final_path == str(result.final_path)
    # the file and the in-process sinks saw the same stream
    assert [e.type for e in events] == types
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        assert json.loads(line)["v"] == 1


def test_event_tail_tolerates_a_half_written_line(tmp_path):
    from engine.events import LogMessage

    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []                       # not there yet
    a = StepCompleted(step=1, epoch=1, loss=0.5, lrs={"unet": 1e-4}, step_seconds=0.1).to_json()
    b = LogMessage(level="info", message="hello, ünïcode").to_json()
    blob = (a + "\n" + b + "\n").encode()
    cut = len(a) + 1 + len(b) // 2
    path.write_bytes(blob[:cut])
    first = tail.read()
    assert [e.step for e in first] == [1]
    assert read_events(path) == first              # a one-shot reader skips the torn line too
    with open(path, "ab") as fh:
        fh.write(blob[cut:] + b"garbage{\n" + b'{"v": 1, "type": "from_the_future", "x": 1}\n')
    second = tail.read()
    assert len(second) == 1 and second[0].message == "hello, ünïcode"
    assert tail.read() == []


def test_headless_prints_the_built_network_but_not_other_info_messages(tmp_path):
    import io

    from engine.events import LogMessage, NetworkBuilt
    from engine.run.journal import parse_line
    from engine.headless import ProgressPrinter

    built = NetworkBuilt.of(192, 72, 32, 16.0)
    assert built.message == "LoRA: 192 U-Net modules, 72 text-encoder modules, dim 32, alpha 16"
    assert parse_line(built.to_json()) == built     # events.jsonl keeps it, and as a log line for the cockpit
    assert isinstance(parse_line(built.to_json()), LogMessage)
    out = io.StringIO()
    printer = ProgressPrinter(out)
    printer(LogMessage(level="info", message="control: pause"))
    printer(built)
    assert out.getvalue() == built.message + "\n"


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_same_losses_different_seed_different(assets, tmp_path):
    r1, _ = train(make_config(assets, tmp_path / "a", seed=1))
    r2, _ = train(make_config(assets, tmp_path / "b", seed=1))
    r3, _ = train(make_config(assets, tmp_path / "c", seed=2))
    assert r1.status == r2.status == r3.status == "completed"
    assert len(r1.losses) == 3
    assert r1.losses == r2.losses
    assert r1.losses != r3.losses
    t1, _ = read(r1.final_path)
    t2, _ = read(r2.final_path)
    t3, _ = read(r3.final_path)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert any(not torch.equal(t1[k], t3[k]) for k in t1)


# ----------------------------------------------------------------------------- semantics on a loaded job
def make_job(assets, out: Path, **overrides):
    """The loaded models/optimizer of a run, without running the loop."""
    from engine.models import load_base_model
    from engine.train.job import Job as _Job
    from engine.trainer import Trainer

    cfg = make_config(assets, out, **{"seed": 0, **overrides}).validate()
    plan = plan_run(cfg)
    base = load_base_model(cfg.pretrained_model_name_or_path)
    trainer = Trainer(cfg)
    return _Job(trainer, cfg, plan, base, torch.device("cpu"), None, cfg.seed, time.time(), out)


@pytest.fixture(scope="module")
def job(assets, tmp_path_factory):
    return make_job(assets, tmp_path_factory.mktemp("job"), clip_skip=2, gradient_checkpointing=True)


def test_param_groups_and_gradient_checkpointing(job):
    assert job.group_names == ["unet", "text_encoder"]
    assert [g["lr"] for g in job.optimizer.param_groups] == [1e-4, 5e-5]
    unet_ids = {id(p) for p in job.network.unet_params}
    assert {id(p) for p in job.optimizer.param_groups[0]["params"]} == unet_ids
    assert all(p.requires_grad for g in job.optimizer.param_groups for p in g["params"])
    trainable = [n for n, p in list(job.unet.named_parameters()) + list(job.te.named_parameters()) if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert job.unet.is_gradient_checkpointing
    assert getattr(job.te, "is_activation_checkpointing", None) or job.te.is_gradient_checkpointing
    assert all(not p.requires_grad for p in job.vae.parameters())


def test_clip_skip_2_is_penultimate_layer_through_final_layer_norm(job, assets):
    from transformers import CLIPTextModel, CLIPTokenizer

    captions = ["spyke, red jacket", "a city at night"]
    with torch.no_grad():
        ours = job._encode_prompts(captions)
        te = CLIPTextModel.from_pretrained(assets["model"] / "text_encoder").eval()
        tok = CLIPTokenizer.from_pretrained(assets["model"] / "tokenizer")
        ids = tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        expected = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-2])  # transformers 5 flattens
        last = out.last_hidden_state
    assert ours.shape == (2, tok.model_max_length, te.config.hidden_size)
    assert torch.allclose(ours, expected, atol=1e-6)      # LoRA up is zero at init: same as the base model
    assert not torch.allclose(ours, last, atol=1e-3)      # …and really not the last layer
    job.cfg = job.cfg.replace(clip_skip=None)
    try:
        with torch.no_grad():
            assert torch.allclose(job._encode_prompts(captions), last, atol=1e-6)
    finally:
        job.cfg = job.cfg.replace(clip_skip=2)


def _loss_with(job, batch, state, **cfg_changes):
    """job._loss on ``batch`` with the noise generator at ``state``; returns (loss, noise, timesteps)."""
    seen = {}
    add_noise = job.noise_scheduler.add_noise

    def spy(latents, noise, timesteps):
        seen["noise"], seen["t"] = noise.clone(), timesteps.clone()
        return add_noise(latents, noise, timesteps)

    saved = job.cfg
    job.cfg = job.cfg.replace(**cfg_changes)
    job.noise_scheduler.add_noise = spy
    try:
        job.noise_gen.set_state(state)
        with torch.no_grad():
            loss = job._loss(batch)
    finally:
        job.cfg = saved
        del job.noise_scheduler.add_noise
    return float(loss), seen["noise"], seen["t"]


def test_min_snr_gamma_noise_offset_prior_loss_weight(job):
    import random

    batch = job.plan.dataset.load_batch(job.plan.dataset.epoch_batches(0, 0)[0], random.Random(0))
    job.latent_cache = None
    gen = torch.Generator().manual_seed(0)
    # the VAE sample also draws from noise_gen: compare runs from identical generator states
    weighted = 0
    for k in range(16):
        if weighted and k >= 4:
            break
        gen.manual_seed(k)
        state = gen.get_state()
        base, noise0, t0 = _loss_with(job, batch, state)
        gamma, _, t1 = _loss_with(job, batch, state, min_snr_gamma=5.0)
        assert torch.equal(t0, t1)
        ac = float(job.alphas_cumprod[t0[0]])
        snr = ac / (1 - ac)
        assert gamma == pytest.approx(base * min(snr, 5.0) / snr, rel=1e-5)
        weighted += snr > 5.0
    assert weighted > 0        # some timesteps actually got down-weighted
    state = gen.get_state()
    base, noise0, t0 = _loss_with(job, batch, state)
    offset, noise1, t1 = _loss_with(job, batch, state, noise_offset=0.1)
    assert offset != base
    diff = noise1 - noise0     # the offset is one value per sample and channel
    assert diff.abs().max() > 0
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    # prior_loss_weight scales only regularisation samples
    reg = type(batch)(**{**batch.__dict__, "is_reg": torch.ones_like(batch.is_reg)})
    assert _loss_with(job, reg, state, prior_loss_weight=0.25)[0] == pytest.approx(base * 0.25, rel=1e-6)
    assert _loss_with(job, batch, state, prior_loss_weight=0.25)[0] == pytest.approx(base, rel=1e-6)


# ----------------------------------------------------------------------------- more runs
def test_cache_latents_encodes_once_and_text_encoder_lr_0_freezes_te(assets, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    encode = AutoencoderKL.encode

    def counting(self, x, *a, **k):
        calls.append(x.shape[0])
        return encode(self, x, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    cfg = make_config(assets, tmp_path, cache_latents=True, text_encoder_lr=0.0, max_train_steps=6)
    result, events = train(cfg)
    assert result.status == "completed", result.error
    assert sum(calls) == 4                      # 4 images, each encoded once, none per step
    assert "caching" in [e.phase for e in of(events, PhaseChanged)]
    steps = of(events, StepCompleted)
    assert len(steps) == 6 and all(set(e.lrs) == {"unet"} for e in steps)
    tensors, meta = read(result.final_path)
    assert meta["ss_cache_latents"] == "True" and float(meta["ss_text_encoder_lr"]) == 0.0
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    unet_up = [v for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te_up and all(torch.count_nonzero(v) == 0 for v in te_up)       # kohya still saves them, untrained
    assert any(torch.count_nonzero(v) > 0 for v in unet_up)


def test_bf16_runs_on_cpu_and_fp16_is_a_clear_error(assets, tmp_path):
    result, _ = train(make_config(assets, tmp_path / "bf16", mixed_precision="bf16", max_train_steps=2))
    assert result.status == "completed", result.error
    assert all(math.isfinite(x) for x in result.losses)
    tensors, meta = read(result.final_path)
    assert meta["ss_mixed_precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in tensors.values())   # save_precision float
    result, events = train(make_config(assets, tmp_path / "fp16", mixed_precision="fp16", max_train_steps=2))
    assert result.status == "failed"
    assert "fp16" in result.error and "\n" not in result.error and "bf16" in result.error
    assert not list((tmp_path / "fp16").rglob("*.safetensors"))
    assert of(events, RunFinished)[-1].status == "failed"


# ----------------------------------------------------------------------------- control
def wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_pause_save_resume_abort_with_save(assets, tmp_path):
    from engine.session import start_training

    events: list = []
    lock = threading.Lock()
    holder: dict = {}

    def sink(e):
        with lock:
            events.append(e)
        if isinstance(e, StepCompleted) and e.step == 2:
            holder["h"].control.pause()
        if isinstance(e, StepCompleted) and e.step == 4:
            holder["h"].control.abort(save=True)

    cfg = make_config(assets, tmp_path, max_train_steps=8)
    holder["h"] = handle = start_training(cfg, [sink])
    assert wait_for(lambda: any(isinstance(e, PhaseChanged) and e.phase == "paused" for e in events))
    time.sleep(0.6)
    with lock:
        assert [e.step for e in of(events, StepCompleted)] == [1, 2]
        n_before = len(events)
    handle.control.save()             # served while paused
    assert wait_for(lambda: any(isinstance(e, CheckpointSaved) for e in events))
    time.sleep(0.2)
    with lock:
        assert of(events, StepCompleted)[-1].step == 2
        manual = of(events, CheckpointSaved)
    assert [(c.kind, c.step) for c in manual] == [("manual", 2)]
    assert Path(manual[0].path).name == f"{NAME}-step00000002.safetensors"
    assert wait_for(lambda: [e.phase for e in of(events[n_before:], PhaseChanged)] == ["saving", "paused"])
    handle.control.resume()
    assert handle.wait(120)
    result = handle.result
    assert result.status == "aborted"
    assert [e.step for e in of(events, StepCompleted)] == [1, 2, 3, 4]
    after_pause = events[n_before:]
    assert "training" in [e.phase for e in of(after_pause, PhaseChanged)]
    saved = of(events, CheckpointSaved)
    assert [(c.kind, c.step) for c in saved] == [("manual", 2), ("abort", 4)]
    abort_file = Path(cfg.output_dir) / f"{NAME}-step00000004.safetensors"
    assert Path(saved[-1].path) == abort_file and abort_file.exists()
    assert saved[-1].state_dir and Path(saved[-1].state_dir).name == f"{NAME}-step00000004-state"
    assert Path(saved[-1].state_dir).is_dir()
    assert not (Path(cfg.output_dir) / f"{NAME}.safetensors").exists()
    _, meta = read(abort_file)
    assert meta["ss_steps"] == "4"
    fin = of(events, RunFinished)[-1]
    assert fin.status == "aborted" and fin.step == 4


def test_save_now_then_abort_without_saving(assets, tmp_path):
    from engine.session import start_training

    holder: dict = {}
    events: list = []

    def sink(e):
        events.append(e)
        if isinstance(e, StepCompleted) and e.step == 1:
            holder["h"].control.save()
        if isinstance(e, StepCompleted) and e.step == 2:
            holder["h"].control.abort(save=False)

    cfg = make_config(assets, tmp_path, max_train_steps=8)
    holder["h"] = handle = start_training(cfg, [sink])
    assert handle.wait(120)
    assert handle.result.status == "aborted"
    assert [(c.kind, c.step) for c in of(events, CheckpointSaved)] == [("manual", 1)]
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"{NAME}-step00000001.safetensors"]
    assert not [p for p in out.iterdir() if p.name.endswith("-state")]
    assert [e.step for e in of(events, StepCompleted)] == [1, 2]


def test_latents_cached_on_disk_train_exactly_as_in_memory_and_are_reused(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "spyke-cockpit" / "latents"
    memory, _ = train(make_config(assets, tmp_path / "memory", cache_latents=True, seed=5))
    cold, _ = train(make_config(assets, tmp_path / "cold", cache_latents_to_disk=True, seed=5))
    entries = sorted(p for p in folder.rglob("*.safetensors"))
    assert len(entries) == 4                                   # one per image (the small dataset does not flip)
    stamps = [p.stat().st_mtime_ns for p in entries]
    warm, _ = train(make_config(assets, tmp_path / "warm", cache_latents_to_disk=True, seed=5))
    assert [p.stat().st_mtime_ns for p in sorted(folder.rglob("*.safetensors"))] == stamps   # read, not rewritten
    assert memory.status == cold.status == warm.status == "completed"
    assert memory.losses == cold.losses == warm.losses
