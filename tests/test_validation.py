"""The validation loss: the held-out split (--validation_split / --validation_seed and the dataset
TOML keys), the pass (fixed timesteps and noise, training RNGs untouched), when it runs, its
events, the cockpit's checkpoint table, the TensorBoard tags, the metadata and exact resume.

Runs are a few steps at 64 px on a 5-image dataset on the shared tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.dataset_split import split_train_val, train_count
from engine.errors import ConfigError, DatasetError
from engine.events import CheckpointSaved, PhaseChanged, StepCompleted, ValidationLoss
from engine.plan import plan_run
from engine.tiny import generate_dataset
from tests.test_durable import train as train_with_control

NAME = "val_demo"


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """5 images x 1 repeat at 64 px: validation_split 0.4 trains on 3 (3 steps per epoch) and holds out 2."""
    return generate_dataset(tmp_path_factory.mktemp("five"), num_images=5, num_repeats=1, resolution=64, seed=5)


def make_config(tiny_cache, five, out: Path, **overrides):
    from engine.demo import prepare_demo

    values = dict(dataset_config=str(five.dataset_toml), resolution="64", max_train_epochs=None, max_train_steps=4,
                  save_every_n_steps=2, save_state=False, output_name=NAME, network_dim=4, network_alpha=2.0,
                  gradient_checkpointing=False, seed=42, output_dir=str(out))
    values.update(overrides)
    return prepare_demo(root=tiny_cache, output_root=out.parent, **values).validate()


def train(cfg):
    from engine.trainer import Trainer

    events: list = []
    result = Trainer(cfg, sinks=[events.append]).run()
    assert result.status == "completed", result.error
    return result, events


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def held_out(plan) -> list[str]:
    return sorted(e.path.name for e in plan.dataset.validation.entries)


# ----------------------------------------------------------------------------- the split
def test_split_keeps_kohyas_training_count_and_holds_out_the_rest():
    assert [train_count(n, 0.4) for n in (1, 2, 3, 5, 10)] == [1, 2, 2, 3, 6]
    trained, held = split_train_val(list("abcde"), 0.4, seed=7)
    assert len(trained) == 3 and len(held) == 2 and sorted(trained + held) == list("abcde")
    assert split_train_val(list("abcde"), 0.0, seed=7) == (list("abcde"), [])
    # n=3 at 0.5: kohya's two datasets would share an image; here the parts never overlap
    trained, held = split_train_val(list("abc"), 0.5, seed=1)
    assert len(trained) == 2 and len(held) == 1 and not set(trained) & set(held)


def test_held_out_images_never_appear_in_training_batches(tiny_cache, five, tmp_path):
    plain = plan_run(make_config(tiny_cache, five, tmp_path / "a", max_train_steps=12))
    plan = plan_run(make_config(tiny_cache, five, tmp_path / "b", max_train_steps=12, validation_split=0.4))
    assert plain.dataset.validation is None and plain.batches_per_epoch == 5
    # the training set shrinks, and so do the batches per epoch and the epochs' steps (as kohya's)
    assert plan.batches_per_epoch == 3 and plan.num_epochs == 4
    assert plan.dataset.num_train_images == 3
    held = set(held_out(plan))
    assert len(held) == 2
    trained = set()
    for epoch in range(plan.num_epochs):
        for batch in plan.dataset.epoch_batches(epoch, 42):
            trained |= {plan.dataset.entries[plan.dataset.sample_to_entry(s)].path.name for s in batch}
    assert trained and not trained & held
    assert trained | held == {f"img_{i:03d}.png" for i in range(5)}
    assert sum(len(b) for b in plan.dataset.validation.validation_batches()) == 2


def test_the_same_validation_seed_holds_out_the_same_images(tiny_cache, five, tmp_path):
    def held(**kw):
        return held_out(plan_run(make_config(tiny_cache, five, tmp_path / "x", validation_split=0.4, **kw)))

    assert held(validation_seed=3) == held(validation_seed=3, seed=7)
    assert len({tuple(held(validation_seed=s)) for s in range(6)}) > 1     # the seed does choose
    assert held(seed=11) == held(validation_seed=11)                       # without it: the run's --seed


def test_dataset_toml_validation_keys_override_the_flags(tiny_cache, five, tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text(five.dataset_toml.read_text().replace("[[datasets]]\n",
                                                          "[[datasets]]\nvalidation_split = 0.4\nvalidation_seed = 3\n"))
    from_toml = plan_run(make_config(tiny_cache, five, tmp_path / "t", dataset_config=str(toml)))
    from_flags = plan_run(make_config(tiny_cache, five, tmp_path / "f", validation_split=0.4, validation_seed=3))
    assert held_out(from_toml) == held_out(from_flags)


def test_a_validation_split_of_one_or_more_is_one_clear_error(tiny_cache, five, tmp_path):
    with pytest.raises(ConfigError, match=r"^--validation_split must be below 1"):
        make_config(tiny_cache, five, tmp_path / "o", validation_split=1.0)
    toml = tmp_path / "ds.toml"
    toml.write_text(five.dataset_toml.read_text().replace("[[datasets]]\n", "[[datasets]]\nvalidation_split = 1.5\n"))
    with pytest.raises(DatasetError, match=r"datasets\[0\]: validation_split = 1.5 must be from 0 up to"):
        plan_run(make_config(tiny_cache, five, tmp_path / "o2", dataset_config=str(toml)))


def test_a_split_too_small_to_hold_out_an_image_is_a_plan_warning(tiny_cache, five, tmp_path):
    plan = plan_run(make_config(tiny_cache, five, tmp_path / "w", validation_split=0.1))
    assert plan.dataset.validation is None
    assert any("validation_split holds out no image" in w for w in plan.warnings)


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def val_run(tiny_cache, five, tmp_path_factory):
    """4 steps, 3 per epoch, files at steps 2 and 4 and the final at 4."""
    from engine.train import validation

    seen = []
    original = validation.Validator.compute

    def spying(self, epoch, step, **kw):
        import torch

        st = self.job.step
        before = (st.noise_gen.get_state().clone(), st.data_rng.getstate(), torch.get_rng_state().clone())
        value = original(self, epoch, step, **kw)
        after = (st.noise_gen.get_state(), st.data_rng.getstate(), torch.get_rng_state())
        seen.append(bool((before[0] == after[0]).all()) and before[1] == after[1] and bool((before[2] == after[2]).all()))
        return value

    validation.Validator.compute = spying
    try:
        cfg = make_config(tiny_cache, five, tmp_path_factory.mktemp("val") / "out", validation_split=0.4)
        result, events = train(cfg)
    finally:
        validation.Validator.compute = original
    return cfg, result, events, seen


def test_a_validation_pass_leaves_the_training_rngs_as_they_were(val_run):
    _, _, _, seen = val_run
    assert seen and all(seen)


def test_validation_loss_at_each_checkpoint_and_epoch_end_with_the_file(val_run):
    cfg, result, events, _ = val_run
    out = Path(cfg.output_dir)
    got = [(e.step, e.epoch, Path(e.checkpoint).name if e.checkpoint else None, e.kinds, e.images)
           for e in of(events, ValidationLoss)]
    assert got == [
        (2, 1, f"{NAME}-step00000002.safetensors", ["checkpoint"], 2),
        (3, 1, None, ["epoch"], 2),
        (4, 2, f"{NAME}-step00000004.safetensors", ["epoch", "checkpoint"], 2),
        (4, 2, f"{NAME}.safetensors", ["checkpoint"], 2),
    ]
    vals = of(events, ValidationLoss)
    assert vals[2].loss == vals[3].loss                 # one pass for the two files of step 4
    assert all(0 < v.loss < 10 for v in vals)
    assert str(out / f"{NAME}.safetensors") == vals[3].checkpoint == str(result.final_path)
    # phases: validating, then back to training (or finished after the final file)
    phases = [e.phase for e in of(events, PhaseChanged)]
    assert phases.count("validating") == 3
    after = [phases[i + 1] for i, p in enumerate(phases) if p == "validating"]
    assert after == ["training", "training", "finished"]


def test_more_validation_passes_do_not_change_the_training_losses(val_run):
    cfg, _, events, _ = val_run
    _, every = train(cfg.replace(output_dir=str(Path(cfg.output_dir).parent / "every"), validate_every_n_steps=1,
                                 max_validation_steps=1))
    assert sorted({e.step for e in of(every, ValidationLoss)}) == [1, 2, 3, 4]
    assert all(e.images == 1 and e.batches == 1 for e in of(every, ValidationLoss))   # max_validation_steps
    assert [e.loss for e in of(events, StepCompleted)] == [e.loss for e in of(every, StepCompleted)]


def test_the_cockpit_checkpoint_table_shows_each_files_validation_loss(val_run):
    from cockpit.state import CockpitState, best_validation, reduce_all

    _, _, events, _ = val_run
    state = reduce_all(CockpitState(), events)
    by_step = {e.step: e.loss for e in of(events, ValidationLoss)}
    rows = {r.name: r.val_loss for r in state.checkpoints}
    assert rows == {f"{NAME}-step00000002.safetensors": by_step[2], f"{NAME}-step00000004.safetensors": by_step[4],
                    f"{NAME}.safetensors": by_step[4]}
    assert best_validation(state).val_loss == min(rows.values())
    assert len(of(events, CheckpointSaved)) == 3


def test_tensorboard_gets_kohyas_step_and_epoch_validation_tags_once_per_pass(val_run):
    from engine.events import RunStarted
    from engine.trackers import KohyaScalars

    _, _, events, _ = val_run
    scalars = KohyaScalars()
    scalars.start(of(events, RunStarted)[0])
    tags = []
    for e in events:
        records = scalars.records(e)
        if isinstance(e, ValidationLoss):
            tags += [(tag, tb_step) for logs, tb_step, _, _ in records for tag in logs if tag.endswith("average")]
    assert tags == [("loss/validation/step_average", 2), ("loss/validation/epoch_average", 1),
                    ("loss/validation/step_average", 4), ("loss/validation/epoch_average", 2)]


def test_checkpoint_metadata_records_the_validation_settings(val_run):
    from engine.checkpoint import read_lora_file

    _, result, _, _ = val_run
    _, meta = read_lora_file(result.final_path)
    assert {k: meta[k] for k in ("ss_num_validation_images", "ss_validation_split", "ss_validation_seed",
                                 "ss_max_validation_steps", "ss_validate_every_n_steps",
                                 "ss_validate_every_n_epochs", "ss_num_train_images")} == {
        "ss_num_validation_images": "2", "ss_validation_split": "0.4", "ss_validation_seed": "None",
        "ss_max_validation_steps": "None", "ss_validate_every_n_steps": "None",
        "ss_validate_every_n_epochs": "None", "ss_num_train_images": "3"}


def test_without_a_split_validation_flags_change_nothing(tiny_cache, five, tmp_path):
    _, plain = train(make_config(tiny_cache, five, tmp_path / "plain", max_train_steps=2))
    _, flagged = train(make_config(tiny_cache, five, tmp_path / "flagged", max_train_steps=2, validation_split=0.0,
                                   validate_every_n_steps=1, max_validation_steps=1, validation_seed=9))
    assert of(flagged, ValidationLoss) == [] and "validating" not in [e.phase for e in of(flagged, PhaseChanged)]
    assert [e.loss for e in of(plain, StepCompleted)] == [e.loss for e in of(flagged, StepCompleted)]
    assert len(of(plain, StepCompleted)) == 2


def test_validation_values_are_reproducible_and_exact_across_a_resume(val_run):
    """The same config and seed: the aborted run's value at step 2 and the resumed run's at the
    final file are exactly the straight run's, and so are the training losses."""
    cfg, _, events, _ = val_run
    out = Path(cfg.output_dir).parent / "resumed"
    cfg = cfg.replace(output_dir=str(out), save_state=True)
    aborted = train_with_control(cfg, abort_at=3)
    assert aborted.result.status == "aborted"
    resumed = train_with_control(cfg.replace(resume=str(out / f"{NAME}-step00000003-state")))
    assert resumed.result.status == "completed", resumed.result.error
    assert [e.loss for e in aborted.steps + resumed.steps] == [e.loss for e in of(events, StepCompleted)]

    def values(evs):
        return [(e.step, Path(e.checkpoint).name if e.checkpoint else None, e.loss) for e in evs]

    straight = values(of(events, ValidationLoss))
    assert values(aborted.of(ValidationLoss)) + values(resumed.of(ValidationLoss)) == straight


def test_headless_prints_one_validation_line_per_pass():
    import io

    from engine.headless import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(out)
    for path in ("/o/a-step00000004.safetensors", "/o/a.safetensors"):
        printer(ValidationLoss(step=4, epoch=2, loss=0.123456, images=2, checkpoint=path))
    assert out.getvalue() == "validation loss 0.1235 at step 4 (2 images)\n"
