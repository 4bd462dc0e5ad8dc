"""kohya's saving flags on the tiny model: --save_last_n_* pruning (only this run's files, never a
protected one), --save_n_epoch_ratio, --training_comment, --no_metadata, --network_weights and
--dim_from_weights; and the setup's --vae, --full_bf16 and attention-kernel line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.events import CheckpointRemoved, LogMessage, StepCompleted
from engine.plan import plan_run
from engine.tiny import generate_dataset

NAME = "saving"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_cache):
    small = generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)
    return {"root": tiny_cache, "model": tiny_cache / "tiny-sd15", "small": small}


def make_config(assets, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(assets["model"]), dataset_config=str(assets["small"].dataset_toml),
                  resolution="64", max_train_steps=3, output_dir=str(out), output_name=NAME, network_dim=4,
                  network_alpha=2.0, learning_rate=1e-3, seed=7, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def train(cfg):
    from engine.trainer import Trainer

    events: list = []
    result = Trainer(cfg, sinks=[events.append]).run()
    assert result.status == "completed", result.error
    return result, events


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepCompleted)]


def logs(events) -> list[str]:
    return [e.message for e in events if isinstance(e, LogMessage)]


# ----------------------------------------------------------------------------- pruning
def test_save_last_n_steps_leaves_kohyas_files_and_states(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "o", max_train_steps=5, save_every_n_steps=1, save_last_n_steps=2,
                      save_state=True)
    _, events = train(cfg)
    kept = {f"{NAME}-step{s:08d}.safetensors" for s in (3, 4, 5)} | {f"{NAME}-step{s:08d}-state" for s in (3, 4, 5)}
    assert names(tmp_path / "o") == kept | {f"{NAME}.safetensors", f"{NAME}-state"}
    assert f"removing old checkpoint: {tmp_path / 'o' / f'{NAME}-step00000001.safetensors'}" in logs(events)
    removed = [(Path(e.path).name, e.step) for e in events if isinstance(e, CheckpointRemoved)]
    assert removed == [(f"{NAME}-step{s:08d}.safetensors", s) for s in (1, 2)]     # what a viewer stops offering
    assert [c.filename for c in plan_run(cfg).surviving_checkpoints()] == [
        f"{NAME}-step{s:08d}.safetensors" for s in (3, 4, 5)] + [f"{NAME}.safetensors"]


def test_save_last_n_steps_state_keeps_its_own_window_of_states(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "o", max_train_steps=5, save_every_n_steps=1, save_last_n_steps=2,
                      save_last_n_steps_state=1, save_state=True)
    train(cfg)
    kept = {f"{NAME}-step{s:08d}.safetensors" for s in (3, 4, 5)} | {f"{NAME}-step{s:08d}-state" for s in (4, 5)}
    assert names(tmp_path / "o") == kept | {f"{NAME}.safetensors", f"{NAME}-state"}


def _pruner(tmp_path, **cfg_values):
    from engine.train.pruning import Pruner

    cfg = SimpleNamespace(output_dir=str(tmp_path), output_name=NAME, save_every_n_steps=1, save_last_n_steps=2,
                          save_last_n_steps_state=None, save_last_n_epochs=None, save_last_n_epochs_state=None,
                          save_every_n_epochs=None, save_n_epoch_ratio=None, **cfg_values)
    said: list[str] = []
    plan = SimpleNamespace(checkpoints=[], num_epochs=1, save_every_n_epochs=None)
    return Pruner(cfg, plan, "run-a", lambda level, text: said.append(text)), said


def _lora(path: Path, session: str, step: int) -> Path:
    from engine.checkpoint import save_lora_file

    save_lora_file(path, {"x.alpha": torch.tensor(1.0)}, {"ss_session_id": session, "ss_steps": str(step)})
    return path


def test_pruning_never_removes_a_file_another_run_wrote(tmp_path):
    pruner, said = _pruner(tmp_path)
    foreign = _lora(tmp_path / f"{NAME}-step00000001.safetensors", "run-b", 1)
    assert pruner.after_save("step", 4, 1) == []
    assert foreign.is_file()
    assert said == [f"not removing old checkpoint {foreign}: it is not from this run"]
    own = _lora(tmp_path / f"{NAME}-step00000002.safetensors", "run-a", 2)
    assert pruner.after_save("step", 5, 1) == [own] and not own.exists()


def test_pruning_keeps_a_protected_checkpoint(tmp_path):
    pruner, _ = _pruner(tmp_path)
    best = _lora(tmp_path / f"{NAME}-step00000001.safetensors", "run-a", 1)
    pruner.protected.add(best)
    assert pruner.after_save("step", 4, 1) == []
    assert best.is_file()


def test_save_last_n_epochs_plan_keeps_the_last_epoch_files(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "o", max_train_epochs=6, save_every_n_epochs=1, save_last_n_epochs=2)
    plan = plan_run(cfg)
    assert [c.filename for c in plan.surviving_checkpoints()] == [
        f"{NAME}-000004.safetensors", f"{NAME}-000005.safetensors", f"{NAME}.safetensors"]
    from cockpit.panels import preview_text

    shown = preview_text(plan).plain
    assert "6 checkpoints (3 kept):" in shown and f"{NAME}-000001.safetensors  (removed later)" in shown
    validated = preview_text(plan_run(make_config(assets, tmp_path / "v", max_train_epochs=6, save_every_n_epochs=1,
                                                  save_last_n_epochs=2, validation_split=0.5))).plain
    assert f"{NAME}-000001.safetensors  (removed later unless it has the best validation loss)" in validated


def test_save_n_epoch_ratio_sets_the_epoch_interval_as_kohya(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "o", max_train_epochs=7, save_n_epoch_ratio=3)
    plan = plan_run(cfg)   # kohya: floor(7 / 3) = 2
    assert plan.save_every_n_epochs == 2
    assert [c.epoch for c in plan.checkpoints if c.kind == "epoch"] == [2, 4, 6]
    one = plan_run(make_config(assets, tmp_path / "p", max_train_epochs=2, save_n_epoch_ratio=5))
    assert one.save_every_n_epochs == 1   # kohya: "or 1"


def test_saving_flags_parse_from_the_kohya_command_line():
    from engine.cli_args import make_parser, parse_train_args

    parser = make_parser("spyke-cockpit train", "test", extra=[(("--headless",), {"action": "store_true"})])
    cfg = parse_train_args(parser, ["--save_last_n_steps=2", "--save_last_n_epochs_state", "3",
                                    "--save_n_epoch_ratio=4", "--training_comment", "a b", "--no_metadata",
                                    "--network_weights=x.safetensors", "--dim_from_weights"], notes=[])[1]
    assert (cfg.save_last_n_steps, cfg.save_last_n_epochs_state, cfg.save_n_epoch_ratio) == (2, 3, 4)
    assert (cfg.training_comment, cfg.no_metadata, cfg.network_weights, cfg.dim_from_weights) == (
        "a b", True, "x.safetensors", True)


# ----------------------------------------------------------------------------- metadata
def test_training_comment_is_in_the_metadata(assets, tmp_path):
    from engine.checkpoint import read_lora_metadata

    result, events = train(make_config(assets, tmp_path / "o", max_train_steps=1, training_comment="trigger: spyke"))
    assert read_lora_metadata(result.final_path)["ss_training_comment"] == "trigger: spyke"
    assert any(m.startswith("attention: SDPA (AttnProcessor2_0), kernel _scaled_dot_product") for m in logs(events))


def test_no_metadata_writes_only_kohyas_minimal_keys(assets, tmp_path):
    from engine.checkpoint import read_lora_metadata

    result, _ = train(make_config(assets, tmp_path / "o", max_train_steps=1, no_metadata=True,
                                  training_comment="secret"))
    meta = read_lora_metadata(result.final_path)
    ss = {k for k in meta if k.startswith("ss_")}
    # kohya's SS_METADATA_MINIMUM_KEYS (ss_network_args only with network_args), plus the run's own id and step
    assert ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "ss_session_id", "ss_steps"}
    assert {k for k in meta if not k.startswith(("ss_", "modelspec."))} == {"sshs_model_hash", "sshs_legacy_hash"}


# ----------------------------------------------------------------------------- network_weights
@pytest.fixture(scope="module")
def trained_lora(assets, tmp_path_factory):
    result, _ = train(make_config(assets, tmp_path_factory.mktemp("a"), max_train_steps=2, learning_rate=5e-2))
    return result.final_path


def test_network_weights_start_the_run_from_the_file_ours_or_kohyas(assets, tmp_path, trained_lora):
    from safetensors.torch import save_file

    from engine.checkpoint import read_lora_file

    tensors, _ = read_lora_file(trained_lora)
    kohya = tmp_path / "kohya.safetensors"
    save_file(tensors, str(kohya))   # kohya-keyed, no metadata at all
    tiny_lr = dict(max_train_steps=1, learning_rate=1e-12)
    ours_result, ours = train(make_config(assets, tmp_path / "b", network_weights=str(trained_lora), **tiny_lr))
    _, theirs = train(make_config(assets, tmp_path / "c", network_weights=str(kohya), network_dim=8,
                                  network_alpha=5.0, dim_from_weights=True, **tiny_lr))
    _, fresh = train(make_config(assets, tmp_path / "d", **tiny_lr))
    assert losses(ours) == losses(theirs)
    assert losses(ours) != losses(fresh)
    after, meta = read_lora_file(ours_result.final_path)
    assert all(torch.allclose(after[k].float(), tensors[k].float(), atol=1e-6) for k in tensors)
    assert any(m.startswith(f"load network weights from {trained_lora}: ") for m in logs(ours))


def test_dim_from_weights_takes_dim_and_alpha_from_the_file(tmp_path, trained_lora):
    from engine.network_weights import resolve_dim_from_weights

    cfg = resolve_dim_from_weights(TrainConfig(network_weights=str(trained_lora), network_dim=16,
                                               network_alpha=9.0, dim_from_weights=True))
    assert (cfg.network_dim, cfg.network_alpha) == (4, 2.0)


def test_dim_from_weights_without_network_weights_is_refused_before_the_run():
    assert TrainConfig(dim_from_weights=True).problems()["dim_from_weights"] == (
        "needs --network_weights=<a LoRA file> to read network_dim/alpha from")


def test_network_weights_with_another_alpha_is_one_line(assets, tmp_path, trained_lora):
    from engine.trainer import Trainer

    result = Trainer(make_config(assets, tmp_path / "o", network_weights=str(trained_lora), network_alpha=3.0,
                                 max_train_steps=1)).run()
    assert result.status == "failed"
    assert result.error == (f"--network_weights: {trained_lora} has network_alpha 2 but --network_alpha is 3; "
                            "set --network_alpha=2 or add --dim_from_weights")


# ----------------------------------------------------------------------------- setup: vae, full_bf16
def _base(assets):
    from engine.models import load_base_model

    return load_base_model(assets["model"])


def _latents(vae) -> torch.Tensor:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return vae.encode(image).latent_dist.mean


def test_external_vae_replaces_the_base_vae_folder_or_single_file(assets, tmp_path):
    from safetensors.torch import save_file

    from engine.ldm_convert import diffusers_to_ldm_state_dict
    from engine.train.setup import setup_models

    base = _base(assets)
    want = _latents(base.vae)
    other = _base(assets)
    with torch.no_grad():
        for p in other.vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other.vae.save_pretrained(tmp_path / "vae")
    single = tmp_path / "vae.safetensors"
    save_file(diffusers_to_ldm_state_dict(other.unet, other.vae, other.text_encoder), str(single))
    expected = _latents(other.vae)
    for source in (tmp_path / "vae", single):
        cfg = make_config(assets, tmp_path / "o", vae=str(source), sd_config_dir=str(assets["model"]))
        models = setup_models(cfg, _base(assets), torch.device("cpu"), 1)
        got = _latents(models.vae)
        assert not torch.allclose(got, want)
        assert torch.allclose(got, expected, atol=1e-5)


def test_full_bf16_trains_the_lora_in_bf16_on_the_cpu(assets, tmp_path):
    from engine.train.setup import setup_models

    cfg = make_config(assets, tmp_path / "o", mixed_precision="bf16", full_bf16=True, max_train_steps=1)
    models = setup_models(cfg, _base(assets), torch.device("cpu"), 1)
    assert {p.dtype for p in models.network.unet_params + models.network.text_encoder_params} == {torch.bfloat16}
    result, events = train(cfg)
    assert all(torch.isfinite(torch.tensor(losses(events))))


def test_full_fp16_on_the_cpu_is_one_line(assets, tmp_path):
    from engine.trainer import Trainer

    result = Trainer(make_config(assets, tmp_path / "o", mixed_precision="fp16", full_fp16=True)).run()
    assert result.status == "failed" and result.error.startswith("--")


def test_epoch_pruning_removes_kohyas_epoch_file_and_the_state_saved_with_it():
    from engine.train.pruning import Removal, removals

    cfg = SimpleNamespace(output_name=NAME, save_every_n_steps=None, save_last_n_steps=None,
                          save_last_n_steps_state=None, save_last_n_epochs=2, save_last_n_epochs_state=None)
    at = {1: 4, 2: 8, 3: 12}.get
    gone = removals(cfg, "epoch", 12, 3, every_epochs=1, epoch_step=at)
    assert gone == Removal((f"{NAME}-000001.safetensors",), (4,))
    cfg.save_last_n_epochs_state = 1
    assert removals(cfg, "epoch", 12, 3, every_epochs=1, epoch_step=at).state_steps == (8,)


# ----------------------------------------------------------------------------- save_state_on_train_end
def test_save_state_on_train_end_writes_kohyas_last_state_that_resumes(assets, tmp_path):
    out = tmp_path / "o"
    _, first = train(make_config(assets, out, max_train_steps=2, save_every_n_steps=1,
                                 save_state_on_train_end=True))
    # kohya: only the last state ({output_name}-state), none beside the step files
    assert names(out) == {f"{NAME}-step00000001.safetensors", f"{NAME}-step00000002.safetensors",
                          f"{NAME}.safetensors", f"{NAME}-state"}
    result, resumed = train(make_config(assets, out, max_train_steps=4, resume=str(out / f"{NAME}-state"),
                                        resume_force=True))
    _, straight = train(make_config(assets, tmp_path / "s", max_train_steps=4))
    assert any(m.startswith("resumed from ") and m.endswith(" at step 2") for m in logs(resumed))
    assert losses(first) + losses(resumed) == losses(straight)
    from engine.checkpoint import read_lora_metadata

    assert read_lora_metadata(result.final_path)["ss_steps"] == "4"


# ----------------------------------------------------------------------------- modelspec metadata
MODELSPEC_VALUES = dict(metadata_title="Spyke Style", metadata_author="A. Author", metadata_description="a test",
                        metadata_license="CreativeML Open RAIL-M", metadata_tags="style, test",
                        metadata_usage_hint="use 'spyke'", metadata_merged_from="a, b",
                        metadata_trigger_phrase="spyke style", metadata_preprocessor="none",
                        metadata_is_negative_embedding="False")


def _header_metadata(path: Path) -> dict[str, str]:
    import json

    with open(path, "rb") as fh:
        return json.loads(fh.read(int.from_bytes(fh.read(8), "little")))["__metadata__"]


def test_metadata_flags_are_kohyas_modelspec_keys_even_with_no_metadata(assets, tmp_path):
    import base64

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG\r\n\x1a\nspyke")
    result, _ = train(make_config(assets, tmp_path / "o", max_train_steps=1, no_metadata=True,
                                  metadata_thumbnail=str(thumb), **MODELSPEC_VALUES))
    meta = _header_metadata(result.final_path)
    for flag, value in MODELSPEC_VALUES.items():
        assert meta[f"modelspec.{flag[len('metadata_'):]}"] == value
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumb.read_bytes()).decode()
    assert "ss_training_comment" not in meta and "ss_num_train_images" not in meta   # still --no_metadata


def test_metadata_title_defaults_to_output_name_and_other_flags_stay_out():
    from engine.kohya.metadata import build_metadata

    meta = build_metadata({"output_name": "mine", "training_started_at": 0.0})
    assert meta["modelspec.title"] == "mine"
    assert not {"modelspec.author", "modelspec.usage_hint", "modelspec.thumbnail"} & set(meta)


def test_metadata_flags_parse_and_a_missing_thumbnail_is_one_line(tmp_path):
    from engine.cli_args import make_parser, parse_train_args

    parser = make_parser("spyke-cockpit train", "test", extra=[(("--headless",), {"action": "store_true"})])
    cfg = parse_train_args(parser, [f"--{k}={v}" for k, v in MODELSPEC_VALUES.items()], notes=[])[1]
    assert {k: getattr(cfg, k) for k in MODELSPEC_VALUES} == MODELSPEC_VALUES
    gone = tmp_path / "gone.png"
    assert TrainConfig(metadata_thumbnail=str(gone)).problems()["metadata_thumbnail"] == (
        f"{gone} is not a file; give an image file or a data: URL")


# ----------------------------------------------------------------------------- save_model_as = ckpt | pt
def test_save_model_as_pt_writes_kohyas_torch_save_files_and_prunes_its_own(assets, tmp_path):
    from engine.events import CheckpointSaved
    from engine.train.disk_guard import checkpoint_need

    out = tmp_path / "o"
    result, events = train(make_config(assets, out, save_model_as="pt", save_every_n_steps=1, save_last_n_steps=1))
    assert result.final_path == out / f"{NAME}.pt"
    # kohya's save_last_n_steps=1 removes step 1 at step 3: a .pt has no metadata, the run folder says it is ours
    assert names(out) == {f"{NAME}-step00000002.pt", f"{NAME}-step00000003.pt", f"{NAME}.pt"}
    assert [Path(e.path).name for e in events if isinstance(e, CheckpointRemoved)] == [f"{NAME}-step00000001.pt"]
    tensors = torch.load(result.final_path, map_location="cpu", weights_only=True)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(k[: -len(".lora_down.weight")] + ".alpha" in tensors for k in downs)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    written = [e.bytes for e in events if isinstance(e, CheckpointSaved)][-1]
    assert written == result.final_path.stat().st_size
    need = checkpoint_need({k: tuple(v.shape) for k, v in tensors.items()}, torch.float32, "pt")
    assert written <= need <= written + 512 * len(tensors) + 4096   # the disk check sizes the format it writes


def test_pruning_removes_only_the_pt_files_the_run_folder_records_as_its_own(tmp_path):
    from engine.run.written import record_written

    pruner, said = _pruner(tmp_path, save_model_as="pt")
    foreign = tmp_path / f"{NAME}-step00000001.pt"
    torch.save({"x.alpha": torch.tensor(1.0)}, foreign)
    assert pruner.after_save("step", 4, 1) == [] and foreign.is_file()
    assert said == [f"not removing old checkpoint {foreign}: it is not from this run"]
    own = tmp_path / f"{NAME}-step00000002.pt"
    torch.save({"x.alpha": torch.tensor(1.0)}, own)
    record_written(own, "run-a", 2)
    assert pruner.after_save("step", 5, 1) == [own] and not own.exists()
    changed = tmp_path / f"{NAME}-step00000003.pt"
    torch.save({"x.alpha": torch.tensor(1.0)}, changed)
    record_written(changed, "run-a", 3)
    torch.save({"x.alpha": torch.tensor(2.0), "y.alpha": torch.tensor(1.0)}, changed)   # replaced since
    assert pruner.after_save("step", 6, 1) == [] and changed.is_file()


def test_network_weights_start_from_a_kohya_ckpt_lora(assets, tmp_path, trained_lora):
    from engine.checkpoint import read_lora_file

    tensors, _ = read_lora_file(trained_lora)
    ckpt = tmp_path / "kohya.ckpt"
    torch.save(tensors, ckpt)                        # what kohya's save_weights writes for save_model_as=ckpt
    result, events = train(make_config(assets, tmp_path / "b", network_weights=str(ckpt), network_dim=8,
                                       dim_from_weights=True, max_train_steps=1, learning_rate=1e-12))
    assert any(m.startswith(f"load network weights from {ckpt}: ") for m in logs(events))
    after, _ = read_lora_file(result.final_path)
    assert all(torch.allclose(after[k].float(), tensors[k].float(), atol=1e-6) for k in tensors)


def test_a_pt_run_resumes_over_its_own_files(assets, tmp_path):
    out = tmp_path / "o"
    train(make_config(assets, out, save_model_as="pt", max_train_steps=2, save_every_n_steps=1, save_state=True))
    result, events = train(make_config(assets, out, save_model_as="pt", max_train_steps=3, save_every_n_steps=1,
                                       save_state=True, resume="latest", resume_force=True))
    assert any(m.startswith("resumed from ") for m in logs(events))
    assert {n for n in names(out) if n.endswith(".pt")} == {f"{NAME}-step0000000{s}.pt" for s in (1, 2, 3)} | {
        f"{NAME}.pt"}
    from engine.output_guard import lora_step_of_run

    run_id = next(iter(names(out / ".spyke")))
    assert lora_step_of_run(result.final_path, run_id) == 3


def test_metadata_flags_with_a_pt_file_say_they_are_not_written(assets, tmp_path):
    plan = plan_run(make_config(assets, tmp_path / "o", save_model_as="ckpt", metadata_title="t",
                                training_comment="c"))
    assert ("--training_comment, --metadata_title: not written: a --save_model_as=ckpt file holds the weights "
            "only, no metadata (as in kohya); use --save_model_as=safetensors to keep them") in plan.warnings
    assert not [w for w in plan_run(make_config(assets, tmp_path / "p", metadata_title="t")).warnings
                if "not written" in w]


def test_a_detached_resume_reads_the_rank_from_the_file_as_the_trainer_does(assets, tmp_path, trained_lora):
    import json

    from engine.detach import preflight
    from engine.network_weights import resolve_dim_from_weights

    out = tmp_path / "o"
    state = out / "spyke_demo-step00000001-state"
    state.mkdir(parents=True)
    cfg = make_config(assets, out, network_weights=str(trained_lora), dim_from_weights=True, resume=str(state),
                      network_dim=8)
    saved = resolve_dim_from_weights(cfg.replace(resume=""))     # what the run saved: the file's rank 4
    assert (saved.network_dim, cfg.network_dim) == (4, 8)
    (state / "progress.json").write_text(json.dumps({"global_step": 1, "config": saved.to_dict(),
                                                     "seed": cfg.seed or 1, "run_id": "r1"}))
    run_id, _ = preflight(cfg)
    assert run_id == "r1"
