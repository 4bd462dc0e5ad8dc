"""--save_last_n_* pruning never removes the checkpoint with the best validation loss, within a run and
across a resume (the record is in the run folder); once a later file validates lower, the kept one goes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.events import CheckpointRemoved, LogMessage, ValidationLoss
from engine.tiny import generate_dataset
from tests.test_saving_flags import train

NAME = "best"


@pytest.fixture(scope="module")
def five(tmp_path_factory, tiny_cache):
    """5 images at 64 px; validation_split 0.4 holds out 2. At learning rate 0.3 the first step's file
    validates lowest and later steps overshoot."""
    return generate_dataset(tmp_path_factory.mktemp("five"), num_images=5, num_repeats=1, resolution=64, seed=3)


def make_config(tiny_cache, five, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"), dataset_config=str(five.dataset_toml),
                  resolution="64", max_train_steps=5, output_dir=str(out), output_name=NAME, network_dim=4,
                  network_alpha=2.0, learning_rate=0.3, seed=7, device="cpu", validation_split=0.4,
                  save_every_n_steps=1, save_last_n_steps=1)
    values.update(overrides)
    return TrainConfig(**values)




def step_file(step: int) -> str:
    return f"{NAME}-step{step:08d}.safetensors"


def files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.suffix == ".safetensors"}


def best_of(events) -> tuple[int, float]:
    losses = [(e.loss, e.step) for e in events if isinstance(e, ValidationLoss) and e.checkpoint
              and Path(e.checkpoint).name.startswith(f"{NAME}-step")]
    loss, step = min(losses)
    return step, loss


def test_the_best_validation_checkpoint_survives_the_window(tiny_cache, five, tmp_path):
    out = tmp_path / "o"
    _, events = train(make_config(tiny_cache, five, out, max_train_steps=3))
    step, loss = best_of(events)
    assert step == 1                                   # kohya removes step 1's file at step 3 (save_last_n_steps=1)
    assert files(out) == {step_file(1), step_file(2), step_file(3), f"{NAME}.safetensors"}
    kept = out / step_file(1)
    messages = [e.message for e in events if isinstance(e, LogMessage)]
    assert f"keeping old checkpoint {kept}: it has the best validation loss so far ({loss:.6g}, step 1)" in messages
    assert not [e for e in events if isinstance(e, CheckpointRemoved)]


def test_the_best_validation_checkpoint_survives_a_resume(tiny_cache, five, tmp_path):
    out = tmp_path / "o"
    _, first = train(make_config(tiny_cache, five, out, max_train_steps=2, save_state=True))
    assert best_of(first)[0] == 1 and step_file(1) in files(out)      # still inside the window here
    record = json.loads(next((out / ".spyke").glob("*/best_validation.json")).read_text())
    assert (record["file"], record["step"]) == (step_file(1), 1)
    _, resumed = train(make_config(tiny_cache, five, out, max_train_steps=3, save_state=True, resume_force=True,
                                   resume=str(out / f"{NAME}-step00000002-state")))
    assert any(isinstance(e, LogMessage) and e.message.startswith("resumed from ") for e in resumed)
    # step 1 falls out of the window at the resumed run's step 3 and is kept by the record of the first run
    assert files(out) == {step_file(1), step_file(2), step_file(3), f"{NAME}.safetensors"}
    assert any(isinstance(e, LogMessage) and e.message.startswith(f"keeping old checkpoint {out / step_file(1)}: ")
               for e in resumed)


def _lora(path: Path, session: str, step: int) -> Path:
    from engine.checkpoint import save_lora_file

    save_lora_file(path, {"x.alpha": torch.tensor(1.0)}, {"ss_session_id": session, "ss_steps": str(step)})
    return path


def test_the_kept_checkpoint_goes_once_a_later_one_validates_lower(tmp_path):
    from engine.train.best_checkpoint import BestCheckpoint
    from engine.train.pruning import Pruner

    cfg = SimpleNamespace(output_dir=str(tmp_path), output_name=NAME, save_every_n_steps=1, save_last_n_steps=1,
                          save_last_n_steps_state=None, save_last_n_epochs=None, save_last_n_epochs_state=None,
                          save_every_n_epochs=None, save_n_epoch_ratio=None)
    plan = SimpleNamespace(checkpoints=[], num_epochs=1, save_every_n_epochs=None)
    said: list[str] = []
    record = tmp_path / "run" / "best_validation.json"
    pruner = Pruner(cfg, plan, "run-a", lambda level, text: said.append(text), best=BestCheckpoint(record))
    for step, loss in ((1, 0.5), (2, 0.7)):
        _lora(tmp_path / step_file(step), "run-a", step)
        pruner.after_save("step", step, 1)
        pruner.validated(tmp_path / step_file(step), step, loss)
    _lora(tmp_path / step_file(3), "run-a", 3)
    assert pruner.after_save("step", 3, 1) == []                  # step 1 is out of the window but the best
    assert (tmp_path / step_file(1)).is_file()
    assert BestCheckpoint(record).best.held                          # what a resumed run reads
    pruner.validated(tmp_path / step_file(3), 3, 0.9)                # worse: step 1 stays
    assert (tmp_path / step_file(1)).is_file()
    _lora(tmp_path / step_file(4), "run-a", 4)
    assert pruner.after_save("step", 4, 1) == [tmp_path / step_file(2)]
    pruner.validated(tmp_path / step_file(4), 4, 0.3)                # better: the kept step 1 goes
    assert not (tmp_path / step_file(1)).exists()
    assert said[-1] == f"removing old checkpoint: {tmp_path / step_file(1)} (no longer the best validation loss)"
    assert BestCheckpoint(record).best.file == step_file(4)


def test_a_record_from_after_the_resumed_step_is_dropped(tmp_path):
    from engine.train.best_checkpoint import BestCheckpoint

    record = tmp_path / "best_validation.json"
    best = BestCheckpoint(record)
    best.validated(step_file(6), 6, 0.2)
    again = BestCheckpoint(record)
    again.resumed_at(4)                       # steps 5.. are trained again: their losses will come again
    assert again.best is None and BestCheckpoint(record).best is None
