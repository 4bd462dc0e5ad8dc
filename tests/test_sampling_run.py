"""Sample images during a training run on the tiny model: when they are made, their files, and that
sampling changes nothing about the training itself (losses, LoRA tensors, exact resume)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config_io import build_config
from engine.control import TrainingControl
from engine.demo import prepare_demo
from engine.errors import ConfigError
from engine.events import CheckpointSaved, LogMessage, PhaseChanged, RunStarted, SamplesSaved, StepCompleted
from engine.tiny import generate_dataset

NAME = "s"
SEED = 11
THREE = ("a red square --n blurry --w 64 --h 64 --d 7 --s 2\n"
         "a blue circle --w 128 --h 64 --d 8 --s 2 --l 1\n"
         "a green line --w 64 --h 64 --s 2\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_cache):
    small = generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)
    return {"root": tiny_cache, "small": small}


def make_config(assets, out: Path, **overrides):
    values = dict(dataset_config=str(assets["small"].dataset_toml), resolution="64", max_train_epochs=None,
                  max_train_steps=4, save_every_n_steps=2, save_state=False, output_name=NAME, network_dim=4,
                  network_alpha=2.0, seed=SEED, gradient_checkpointing=False, output_dir=str(out))
    values.update(overrides)
    return prepare_demo(root=assets["root"], output_root=out.parent, **values).validate()


def prompts_file(folder: Path, text: str = THREE, name: str = "prompts.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def train(cfg, *, control=None, on_event=None):
    from engine.trainer import Trainer

    events: list = []

    def sink(event):
        events.append(event)
        if on_event is not None:
            on_event(event)

    result = Trainer(cfg, control=control, sinks=[sink]).run()
    assert result.status in ("completed", "aborted"), result.error
    return result, events


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def losses(events):
    return [e.loss for e in of(events, StepCompleted)]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def sampled(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    cfg = make_config(assets, root / "out", sample_prompts=str(prompts_file(root)), save_state=True)
    return train(cfg)


@pytest.fixture(scope="module")
def plain(assets, tmp_path_factory):
    return train(make_config(assets, tmp_path_factory.mktemp("plain") / "out", save_state=True))


# ---------------------------------------------------------------- config
def test_sampling_flags_without_a_prompts_file_are_one_clear_error(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"^--sample_every_n_steps needs --sample_prompts="):
        make_config(assets, tmp_path, sample_every_n_steps=2)


def test_a_prompts_file_kohya_cannot_read_is_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"^--sample_prompts .*kohya reads \.txt, \.toml or \.json"):
        make_config(assets, tmp_path, sample_prompts=str(tmp_path / "prompts.yaml"))


def test_sample_sampler_takes_kohyas_names_only():
    with pytest.raises(ConfigError, match=r"^--sample_sampler must be one of ddim, pndm"):
        build_config(overrides={"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                "sample_sampler": "warp"}).validate()


# ---------------------------------------------------------------- files at each checkpoint
def test_three_prompts_are_sampled_at_each_checkpoint_with_kohya_names_and_options(sampled):
    from PIL import Image

    from engine.sample.png import read_png_parameters

    result, events = sampled
    batches = of(events, SamplesSaved)
    assert [b.step for b in batches] == [2, 4]  # the final file at step 4 shares the step-4 batch
    steps_saved = {e.step: e.path for e in of(events, CheckpointSaved) if e.kind == "step"}
    for batch in batches:
        assert batch.checkpoint == steps_saved[batch.step]
        assert batch.errors == ["", "", ""]
        assert batch.prompts == ["a red square", "a blue circle", "a green line"]
        assert batch.seeds == [7, 8, SEED + 2]
        names = [Path(p).name for p in batch.paths]
        for i, (name, seed) in enumerate(zip(names, ("_7", "_8", ""))):
            assert re.fullmatch(rf"{NAME}_{batch.step:06d}_{i:02d}_\d{{14}}{seed}\.png", name), name
        assert all(Path(p).parent == Path(result.final_path).parent / "sample" for p in batch.paths)
        sizes = [Image.open(p).size for p in batch.paths]
        assert sizes == [(64, 64), (128, 64), (64, 64)]
        params = [read_png_parameters(p) for p in batch.paths]
        assert [(p["negative_prompt"], p["steps"], p["scale"], p["seed"]) for p in params] == [
            ("blurry", 2, 7.5, 7), ("", 2, 1.0, 8), ("", 2, 7.5, SEED + 2)]
    assert len(list((Path(result.final_path).parent / "sample").glob("*.png"))) == 6
    images = [s for b in batches for s in [b.seconds / len(b.paths)]]
    print(f"sample images: {sum(images) / len(images):.3f} s per image (tiny model, 64 px, 2 steps)")


def test_sampling_shows_as_its_own_phase_and_returns_to_training(sampled):
    _, events = sampled
    phases = [e.phase for e in of(events, PhaseChanged)]
    i = phases.index("sampling")
    assert phases[i + 1] == "training"
    assert phases.count("sampling") == 2


def test_losses_and_lora_are_identical_with_and_without_sampling(sampled, plain):
    (with_result, with_events), (without_result, without_events) = sampled, plain
    assert of(without_events, SamplesSaved) == []
    assert losses(with_events) == losses(without_events)
    a, b = tensors(with_result.final_path), tensors(without_result.final_path)
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)


def test_same_seed_gives_byte_identical_sample_images_in_two_runs(assets, sampled, tmp_path):
    root = tmp_path / "again"
    cfg = make_config(assets, root / "out", sample_prompts=str(prompts_file(root, THREE.splitlines()[0] + "\n")))
    _, events = train(cfg)
    again, _ = of(events, SamplesSaved)
    first, _ = of(sampled[1], SamplesSaved)
    assert again.step == first.step == 2
    assert Path(again.paths[0]).read_bytes() == Path(first.paths[0]).read_bytes()


def test_headless_output_has_one_line_per_sample_batch():
    import io

    from engine.headless import ProgressPrinter

    out = io.StringIO()
    ProgressPrinter(out)(SamplesSaved(step=2, epoch=1, paths=["o/sample/a.png", ""], prompts=["a", "b"],
                                      seeds=[1, 2], errors=["", "x"], seconds=1.25))
    assert out.getvalue() == "samples step 2: 1 image in o/sample (1.2s, 1 failed)\n"


# ---------------------------------------------------------------- the prompts file, requests, failures
def test_prompts_file_edited_mid_run_takes_effect(assets, tmp_path):
    path = prompts_file(tmp_path, "first --w 64 --h 64 --s 2\n")
    cfg = make_config(assets, tmp_path / "out", sample_prompts=str(path), sample_at_first=True, max_train_steps=2)

    def edit(event):
        if isinstance(event, StepCompleted) and event.step == 1:
            path.write_text("second --w 64 --h 64 --s 2\nthird --w 64 --h 64 --s 2\n", encoding="utf-8")

    _, events = train(cfg, on_event=edit)
    batches = of(events, SamplesSaved)
    assert [(b.step, b.prompts) for b in batches] == [(0, ["first"]), (2, ["second", "third"])]
    assert re.fullmatch(rf"{NAME}_e000000_00_\d{{14}}\.png", Path(batches[0].paths[0]).name)
    assert batches[0].checkpoint is None


def test_sample_request_makes_a_batch_at_the_next_boundary_and_at_once_while_paused(assets, tmp_path):
    """From the cockpit (the control) mid-run, then from an attached viewer (the run folder) while paused."""
    from engine.run.channel import send_command
    from engine.run.folder import RunFolder

    path = prompts_file(tmp_path, "only --w 64 --h 64 --s 2\n")
    cfg = make_config(assets, tmp_path / "out", sample_prompts=str(path), max_train_steps=3, save_every_n_steps=None)
    control = TrainingControl()
    run_dir = []

    def press(event):
        if isinstance(event, RunStarted):
            run_dir.append(RunFolder(Path(event.output_dir), event.run_id).path)
        elif isinstance(event, StepCompleted) and event.step == 1:
            control.sample()
        elif isinstance(event, StepCompleted) and event.step == 2:
            control.pause()
            send_command(run_dir[0], "sample", sender="viewer")
        elif isinstance(event, SamplesSaved) and event.step == 2:
            control.resume()

    result, events = train(cfg, control=control, on_event=press)
    batches = of(events, SamplesSaved)
    assert [(b.step, b.checkpoint) for b in batches] == [(1, None), (2, None), (3, str(result.final_path))]
    phases = [e.phase for e in of(events, PhaseChanged)]
    backs = [phases[i + 1] for i, p in enumerate(phases) if p == "sampling"]
    assert backs == ["training", "paused", "finished"]
    assert [e.step for e in of(events, StepCompleted)] == [1, 2, 3]


def test_a_failing_prompt_is_one_warning_and_training_goes_on(assets, tmp_path):
    path = prompts_file(tmp_path, "good --w 64 --h 64 --s 2\nbad --w abc\nshort --ss pndm --s 2 --w 64 --h 64\n")
    cfg = make_config(assets, tmp_path / "out", sample_prompts=str(path), max_train_steps=2)
    result, events = train(cfg)
    assert result.status == "completed"
    assert [e.step for e in of(events, StepCompleted)] == [1, 2]
    (batch,) = of(events, SamplesSaved)
    assert batch.prompts == ["good", "short"]
    assert batch.paths[0] and not batch.paths[1] and "pndm needs at least 4 steps" in batch.errors[1]
    warnings = [e.message for e in of(events, LogMessage) if e.level == "warning" and "sample" in e.message]
    assert len(warnings) == 2
    assert f"{path}:2" in warnings[0] and "--w 'abc' is not a whole number" in warnings[0]
    assert "pndm needs at least 4 steps" in warnings[1]


def test_exact_resume_holds_with_sampling_on(assets, sampled, tmp_path):
    control = TrainingControl()

    def stop(event):
        if isinstance(event, StepCompleted) and event.step == 3:
            control.abort(save=True)

    one = prompts_file(tmp_path, THREE.splitlines()[0] + "\n")  # the prompts do not change the losses
    cfg = make_config(assets, tmp_path / "out", sample_prompts=str(one), save_state=True)
    aborted, first = train(cfg, control=control, on_event=stop)
    assert aborted.status == "aborted"
    state = Path(cfg.output_dir) / f"{NAME}-step00000003-state"
    resumed, rest = train(make_config(assets, Path(cfg.output_dir), sample_prompts=cfg.sample_prompts,
                                      save_state=True, resume=str(state)))
    assert losses(first) + losses(rest) == losses(sampled[1])
    a, b = tensors(resumed.final_path), tensors(sampled[0].final_path)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [b.step for b in of(first, SamplesSaved)] == [2]
    assert [b.step for b in of(rest, SamplesSaved)] == [4]
