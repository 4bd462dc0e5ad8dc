"""Which settings a resumed run may change: every field is run-defining unless it is listed as free."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import TrainConfig
from engine.state import RESUME_FREE, config_mismatches


def _saved(**changes) -> dict:
    return TrainConfig(**changes).to_dict()


def test_every_name_that_may_change_on_resume_is_a_config_field():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert RESUME_FREE <= names, sorted(RESUME_FREE - names)


@pytest.mark.parametrize("name, value", [
    ("loss_type", "huber"), ("resize_interpolation", "bicubic"), ("base_weights", ["merged.safetensors"]),
    ("base_weights_multiplier", [0.5]), ("caption_dropout_rate", 0.1), ("v_parameterization", True),
    ("min_bucket_reso", 320), ("validation_split", 0.2), ("weighted_captions", True), ("vae", "vae.safetensors"),
])
def test_a_setting_that_changes_the_training_is_a_mismatch_on_resume(name, value):
    found = config_mismatches(_saved(), _saved(**{name: value}))
    assert len(found) == 1 and found[0].startswith(f"{name}: saved ")


@pytest.mark.parametrize("name, value", [
    ("save_every_n_steps", 50), ("sample_prompts", "prompts.txt"), ("logging_dir", "logs"),
    ("validate_every_n_steps", 10), ("device", "cpu"), ("nan_policy", "skip"), ("resume", "latest"),
    ("gradient_checkpointing", True), ("network_weights", "start.safetensors"), ("output_dir", "elsewhere"),
])
def test_a_setting_that_leaves_the_training_alone_may_change_on_resume(name, value):
    assert config_mismatches(_saved(), _saved(**{name: value})) == []


def test_a_field_the_saved_run_did_not_know_is_not_compared():
    saved = _saved()
    del saved["resize_interpolation"]    # a state written before the field existed
    assert config_mismatches(saved, _saved(resize_interpolation="area")) == []


def test_a_list_setting_read_back_from_the_state_json_is_unchanged():
    import json

    saved = json.loads(json.dumps(_saved(optimizer_args=["weight_decay=0.1"], base_weights_multiplier=[0.5])))
    assert config_mismatches(saved, _saved(optimizer_args=["weight_decay=0.1"], base_weights_multiplier=[0.5])) == []
    assert config_mismatches(saved, _saved(optimizer_args=["weight_decay=0.2"], base_weights_multiplier=[0.5])) == [
        "optimizer_args: saved ['weight_decay=0.1'], now ['weight_decay=0.2']"]
