"""Sample sets and validation losses in the cockpit's pure reducer."""

from __future__ import annotations

import math

from cockpit.samples import SampleBook, compare_rows, fold
from cockpit.state import CockpitState, reduce, reduce_all
from engine.api import CheckpointSaved, RunStarted, SamplesSaved, ValidationLoss


def samples(step, paths=("a.png", "b.png"), prompts=("cat", "dog"), seeds=(1, 2), errors=(), checkpoint=None):
    return SamplesSaved(step=step, epoch=1, paths=list(paths), prompts=list(prompts), seeds=list(seeds),
                        errors=list(errors), checkpoint=checkpoint, seconds=2.0, t=float(step))


def ckpt(step, name=None):
    return CheckpointSaved(path=f"/o/{name or f'x-{step:06d}'}.safetensors", step=step, epoch=1, bytes=1,
                           kind="step", t=float(step))


def val(step, loss, checkpoint=None):
    return ValidationLoss(step=step, epoch=1, loss=loss, images=3, checkpoint=checkpoint, t=float(step))


def test_a_sample_set_is_kept_by_step_and_prompt_with_path_seed_and_checkpoint():
    state = reduce(CockpitState(), samples(100, checkpoint="/o/x-000100.safetensors"))
    s = state.sample_book.at(100)
    assert s.checkpoint == "/o/x-000100.safetensors" and s.seconds == 2.0
    assert [(i.index, i.prompt, i.path, i.seed) for i in s.images] == [(0, "cat", "a.png", 1), (1, "dog", "b.png", 2)]
    assert state.sample_book.latest is s


def test_reduce_leaves_the_state_it_is_given_unchanged():
    before = reduce(CockpitState(), samples(100))
    after = reduce(before, samples(200))
    assert [s.step for s in before.sample_book.sets] == [100]
    assert [s.step for s in after.sample_book.sets] == [100, 200] and after.version > before.version


def test_a_failed_prompt_keeps_its_reason_and_an_empty_path():
    state = reduce(CockpitState(), samples(50, paths=("a.png", ""), errors=("", "out of memory")))
    failed = state.sample_book.at(50).image(1)
    assert failed.path == "" and failed.error == "out of memory"


def test_samples_made_again_at_a_step_replace_the_earlier_set():
    book = fold(fold(SampleBook(), samples(100, paths=("old.png", "old2.png"))), samples(100))
    assert len(book.sets) == 1 and book.at(100).image(0).path == "a.png"


def test_best_is_the_lowest_finite_validation_loss():
    book = SampleBook()
    for event in (val(100, 0.30), val(200, 0.21), val(300, math.nan), val(400, 0.25)):
        book = fold(book, event)
    assert book.best.step == 200
    assert SampleBook().best is None


def test_prompt_texts_follow_the_latest_wording():
    book = fold(fold(SampleBook(), samples(100, prompts=("cat", "dog"))), samples(200, prompts=("cat", "wolf")))
    assert book.prompts == ("cat", "wolf")


def test_compare_rows_are_the_checkpoints_with_their_samples_validation_and_best():
    state = reduce_all(CockpitState(), [
        RunStarted(run_id="r", output_dir="/o", output_name="x", total_steps=300, num_epochs=1,
                   batches_per_epoch=300, device="cpu", pid=1, config={}, t=0.0),
        ckpt(100), samples(100, checkpoint="/o/x-000100.safetensors"), val(100, 0.3, "/o/x-000100.safetensors"),
        ckpt(200), samples(200), val(200, 0.2),          # matched by step
        ckpt(300, "x"),                                  # a checkpoint without samples is still a row
        samples(250, paths=("g.png",), prompts=("cat",), seeds=(1,)),   # `g` between checkpoints
    ])
    rows = compare_rows(state.sample_book, state.checkpoints, base=state.output_dir)
    assert [(r.step, r.name, r.validation, r.best) for r in rows] == [
        (100, "x-000100.safetensors", 0.3, False), (200, "x-000200.safetensors", 0.2, True),
        (250, "", None, False), (300, "x.safetensors", None, False)]
    assert rows[0].images[0].path == "/o/a.png"                 # relative to the output folder
    assert rows[2].images[1] is None and rows[3].images == (None, None)


def test_a_new_run_start_clears_the_sample_sets():
    state = reduce(CockpitState(), samples(100))
    state = reduce(state, RunStarted(run_id="r2", output_dir="/o", output_name="x", total_steps=10, num_epochs=1,
                                     batches_per_epoch=10, device="cpu", pid=1, config={}, t=1.0))
    assert state.sample_book.sets == ()
