"""--in_json: kohya's fine-tuning metadata with --train_data_dir, the same path as a dataset-TOML
``metadata_file`` subset (captions and tags from the JSON, --dataset_repeats as its repeats)."""

from __future__ import annotations

import json

import pytest

from engine.dataset import DatasetArgs, load_dataset_plan
from engine.errors import DatasetError

CAPTIONS = {"img_000": "json caption zero", "img_001.png": "json caption one"}


@pytest.fixture()
def images(tmp_path):
    from engine.tiny import generate_dataset

    data = generate_dataset(tmp_path / "data", num_images=2, num_repeats=1, resolution=64, seed=5)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({k: {"caption": v, "tags": "red"} for k, v in CAPTIONS.items()}))
    return data.image_dir, meta


def test_in_json_is_one_metadata_file_subset_of_the_train_data_dir_with_dataset_repeats(images):
    image_dir, meta = images
    plan = load_dataset_plan(DatasetArgs(train_data_dir=image_dir, in_json=meta, dataset_repeats=3,
                                         reg_data_dir=image_dir, resolution=(64, 64)))
    assert [(e.path.name, e.caption, e.num_repeats) for e in plan.entries] == [
        ("img_000.png", "json caption zero,red", 3), ("img_001.png", "json caption one,red", 3)]
    sub = plan.datasets[0].subsets[0]
    assert sub.metadata_file == meta and sub.image_dir == image_dir and not sub.is_reg
    assert any("--reg_data_dir ignored because --in_json" in w for w in plan.warnings)


def test_in_json_that_does_not_exist_is_one_line(images, tmp_path):
    image_dir, _ = images
    with pytest.raises(DatasetError, match=r"^--in_json .*missing\.json not found; point it at kohya's metadata"):
        load_dataset_plan(DatasetArgs(train_data_dir=image_dir, in_json=tmp_path / "missing.json"))


def test_a_run_with_in_json_trains_on_the_json_captions(images, tiny_cache, tmp_path, monkeypatch):
    from engine.demo import prepare_demo
    from engine.train.step import TrainStep
    from engine.trainer import Trainer

    image_dir, meta = images
    seen = []
    original = TrainStep.encode_prompts
    monkeypatch.setattr(TrainStep, "encode_prompts", lambda self, captions: (seen.extend(captions),
                                                                              original(self, captions))[1])
    cfg = prepare_demo(root=tiny_cache, output_root=tmp_path / "out", dataset_config="", train_data_dir=str(image_dir),
                       in_json=str(meta), resolution="64", max_train_epochs=None, max_train_steps=2,
                       save_every_n_steps=None, save_state=False, network_dim=4, network_alpha=2.0, seed=1)
    result = Trainer(cfg, sinks=[]).run()
    assert result.status == "completed"
    assert sorted(seen) == ["json caption one,red", "json caption zero,red"]
    from safetensors import safe_open

    with safe_open(str(result.final_path), "pt") as f:      # kohya names the dataset by its metadata file
        assert json.loads(f.metadata()["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 1, "img_count": 2}}
