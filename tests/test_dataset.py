"""The dataset layer against kohya sd-scripts semantics (train_util.py / config_util.py)."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.buckets import BucketSelector, make_bucket_resolutions
from engine.dataset import (
    DatasetArgs,
    compute_total_steps,
    load_dataset_plan,
    process_caption,
)
from engine.errors import DatasetError
from engine.kohya.dataset_metadata import (bucket_info, dataset_dirs_metadata, reg_dataset_dirs_metadata,
                                           tag_frequency)
from engine.tiny import generate_dataset


def _img(path: Path, w: int = 64, h: int = 64, color=(200, 30, 30), caption: str | None = None,
         ext: str = ".caption") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), color)
    im.putpixel((0, 0), (0, 0, 0))  # a marker so flips are visible
    im.save(path)
    if caption is not None:
        path.with_name(path.stem + ext).write_text(caption, encoding="utf-8")
    return path


def _toml(tmp_path: Path, text: str, name: str = "ds.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _plan_toml(tmp_path: Path, text: str, **kw):
    return load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, text), **kw))


def _error(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        _plan_toml(tmp_path, text, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- seed-run step math

@pytest.fixture(scope="module")
def seed_dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("seed"), num_images=23, num_repeats=10, resolution=64)


def test_seed_run_step_math_from_toml(seed_dataset):
    plan = load_dataset_plan(DatasetArgs(dataset_config=seed_dataset.dataset_toml))
    assert len(plan.entries) == 23
    assert plan.num_train_images == 230 and plan.num_reg_images == 0
    assert plan.batches_per_epoch == 230
    assert list(plan.buckets) == [(64, 64)]
    assert compute_total_steps(plan.batches_per_epoch, 4, None) == (920, 4)
    assert compute_total_steps(plan.batches_per_epoch, None, 1600) == (1600, 7)
    assert dataset_dirs_metadata(plan) == {"10_spyke": {"n_repeats": 10, "img_count": 23}}
    assert reg_dataset_dirs_metadata(plan) == {}
    assert plan.warnings == []


def test_seed_run_from_train_data_dir(seed_dataset):
    plan = load_dataset_plan(DatasetArgs(train_data_dir=seed_dataset.image_dir.parent, resolution=(64, 64)))
    assert plan.batches_per_epoch == 230 and plan.num_train_images == 230
    assert {e.num_repeats for e in plan.entries} == {10}
    assert [e.path for e in plan.entries] == sorted(e.path for e in plan.entries)


def test_compute_total_steps_rules():
    # epochs override steps; accumulation divides batches per epoch (ceil)
    assert compute_total_steps(230, 4, 1600) == (920, 4)
    assert compute_total_steps(230, 4, None, gradient_accumulation_steps=4) == (4 * 58, 4)
    assert compute_total_steps(230, None, 100, gradient_accumulation_steps=4) == (100, 2)
    assert compute_total_steps(230, None, None) == (1600, 7)  # kohya's default max_train_steps
    assert compute_total_steps(8, None, 8) == (8, 1)
    with pytest.raises(Exception, match="gradient_accumulation_steps"):
        compute_total_steps(8, None, 8, gradient_accumulation_steps=0)


# ---------------------------------------------------------------- order

def test_epoch_batches_deterministic_and_complete(tmp_path):
    g = generate_dataset(tmp_path, num_images=5, num_repeats=3, resolution=64, batch_size=2,
                         sizes=[(64, 64), (64, 64), (64, 64), (160, 64), (160, 64)])
    text = g.dataset_toml.read_text().replace("enable_bucket = false",
                                              "enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256")
    g.dataset_toml.write_text(text)
    plan = load_dataset_plan(DatasetArgs(dataset_config=g.dataset_toml))
    assert plan.batches_per_epoch == 8  # ceil(9/2) + ceil(6/2)
    state = random.getstate()
    a = plan.epoch_batches(0, seed=42)
    assert plan.epoch_batches(0, seed=42) == a
    assert plan.epoch_batches(1, seed=42) != a
    assert plan.epoch_batches(0, seed=7) != a
    assert random.getstate() == state  # the global RNG is untouched
    for epoch in range(3):
        batches = plan.epoch_batches(epoch, seed=42)
        assert len(batches) == 8
        ids = [s for b in batches for s in b]
        assert sorted(ids) == list(range(plan.num_samples)) == list(range(15))
        for b in batches:
            assert len({plan.entries[plan.sample_to_entry(s)].bucket for s in b}) == 1
            assert 1 <= len(b) <= 2
    # each image owns num_repeats consecutive sample ids
    assert Counter(plan.sample_to_entry(s) for s in range(15)) == {i: 3 for i in range(5)}


# ---------------------------------------------------------------- TOML fallbacks

def test_toml_fallback_subset_dataset_general_cli(tmp_path):
    for i in range(2):
        _img(tmp_path / "a" / f"{i}.png", caption="x, y")
        _img(tmp_path / "b" / f"{i}.png", caption="x, y")
    plan = _plan_toml(tmp_path, """
[general]
batch_size = 2
shuffle_caption = true
keep_tokens = 1
resolution = 128

[[datasets]]
resolution = [64, 64]
num_repeats = 4

  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 2
  num_repeats = 5

  [[datasets.subsets]]
  image_dir = "b"
""", flip_aug=True, train_batch_size=9, shuffle_caption=False)
    ds = plan.datasets[0]
    assert ds.batch_size == 2                 # general beats CLI
    assert ds.resolution == (64, 64)          # dataset beats general
    a, b = plan.entries[0], plan.entries[2]
    assert (a.num_repeats, a.keep_tokens) == (5, 2)   # subset wins
    assert (b.num_repeats, b.keep_tokens) == (4, 1)   # dataset, then general
    assert a.shuffle_caption and b.shuffle_caption    # general beats CLI
    assert a.flip_aug and b.flip_aug                  # CLI fallback
    assert a.path.parent == tmp_path / "a"            # relative to the TOML's folder
    assert plan.batches_per_epoch == 5 + 4            # ceil(18/2), one 64x64 bucket
    assert plan.num_train_images == 18


def test_relative_image_dir_falls_back_to_cwd_and_names_both(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    _img(tmp_path / "imgs" / "0.png", caption="c")
    monkeypatch.chdir(tmp_path)
    toml = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"imgs\"\n"
    plan = load_dataset_plan(DatasetArgs(dataset_config=_toml(cfg_dir, toml)))
    assert plan.entries[0].path.parent.resolve() == (tmp_path / "imgs").resolve()
    msg = _error(cfg_dir, toml.replace("imgs", "nope"))
    assert "nope" in msg and str(cfg_dir / "nope") in msg and "ds.toml" in msg


def test_default_caption_extension_and_override(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="from caption file")
    (tmp_path / "i" / "0.txt").write_text("from txt file")
    base = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n"
    assert _plan_toml(tmp_path, base).entries[0].caption == "from caption file"
    assert _plan_toml(tmp_path, "[general]\ncaption_extension = \".txt\"\n" + base).entries[0].caption == "from txt file"
    assert load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, base), caption_extension=".txt")
                             ).entries[0].caption == "from txt file"


def test_caption_first_line_stripped_and_class_tokens_fallback(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="\ufeff  first line, tag  \nsecond line\n")
    _img(tmp_path / "i" / "1.png")  # no caption file
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                "image_dir = \"i\"\nclass_tokens = \"sks dog\"\n")
    assert [e.caption for e in plan.entries] == ["first line, tag", "sks dog"]
    assert [e.caption_from_file for e in plan.entries] == [True, False]
    assert tag_frequency(plan) == {"i": {"first line": 1, "tag": 1, "sks dog": 1}}


def test_image_without_caption_or_class_tokens_trains_on_an_empty_caption_with_a_warning(tmp_path):
    _img(tmp_path / "i" / "0.png")
    _img(tmp_path / "i" / "1.png", caption="has one")
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n")
    assert [e.caption for e in plan.entries] == ["", "has one"]
    assert plan.warnings == [
        f"{tmp_path / 'i'}: 1 image has no .caption caption file and the subset has no class_tokens (0.png); "
        "it trains on an empty caption, as in kohya; add caption files or set class_tokens"]


def test_a_caption_file_with_an_empty_first_line_trains_on_an_empty_caption_with_a_warning(tmp_path):
    """kohya reads only the first line: blank there is an empty caption, not the class tokens."""
    _img(tmp_path / "i" / "0.png", caption="\n")
    _img(tmp_path / "i" / "1.png", caption="   \nthe caption, on line two\n")
    _img(tmp_path / "i" / "2.png", caption="dog, running")
    _img(tmp_path / "i" / "3.png")                                      # no file: the class tokens
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n"
                                "class_tokens = \"sks\"\n")
    assert [(e.path.name, e.caption, e.caption_from_file) for e in plan.entries] == [
        ("0.png", "", True), ("1.png", "", True), ("2.png", "dog, running", True), ("3.png", "sks", False)]
    assert plan.warnings == [
        f"{tmp_path / 'i'}: 2 caption files have an empty first line (0.png, 1.png); kohya reads only the first "
        "line, so these images train on an empty caption, as in kohya; put the caption on the first line"]
    assert plan.load_batch([0, 1, 2, 3], random.Random(0)).captions == ["", "", "dog, running", "sks"]


def test_a_caption_file_without_a_line_is_one_error_line_as_kohyas_assert(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="")
    msg = _error(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\nclass_tokens = \"x\"\n")
    assert msg == (f"caption file {tmp_path / 'i' / '0.caption'} is empty (not one line; kohya stops on it too); "
                   "write a caption in it, or delete it so the image takes the subset's class tokens")


def _txt_captioned(root: Path, n: int = 3, ext: str = ".txt") -> Path:
    for i in range(n):
        _img(root / "2_spyke" / f"{i}.png", caption=f"spyke, pose {i}", ext=ext)
    return root


def test_captions_under_another_extension_warn_once_naming_the_flag(tmp_path):
    root = _txt_captioned(tmp_path / "train")
    _img(root / "2_spyke" / "3.png")                     # no caption at all: not counted
    plan = load_dataset_plan(DatasetArgs(train_data_dir=root, resolution=(64, 64)))
    assert [e.caption for e in plan.entries] == ["spyke"] * 4      # kohya: the class tokens, no word more
    assert plan.warnings == [
        f"{root.absolute() / '2_spyke'}: 3 of 4 images have no .caption caption file but a .txt file beside them, "
        "so they train on the class tokens 'spyke' alone; set --caption_extension=.txt "
        "(or caption_extension = \".txt\" in the dataset TOML)"
    ]
    toml = _plan_toml(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{root / '2_spyke'}\"\n"
                                "class_tokens = \"sks\"\ncaption_extension = \".tags\"\n")
    (warning,) = toml.warnings
    assert "3 of 4 images have no .tags caption file but a .txt file" in warning and "'sks'" in warning


def test_no_caption_extension_warning_when_captions_match(tmp_path):
    root = _txt_captioned(tmp_path / "train")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=root, resolution=(64, 64), caption_extension=".txt"))
    assert [e.caption for e in plan.entries] == ["spyke, pose 0", "spyke, pose 1", "spyke, pose 2"]
    assert plan.warnings == []
    for i in range(3):                                   # both extensions present: the configured one is used
        (root / "2_spyke" / f"{i}.caption").write_text("from caption")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=root, resolution=(64, 64)))
    assert {e.caption for e in plan.entries} == {"from caption"} and plan.warnings == []


def test_caption_under_another_extension_without_class_tokens_trains_on_an_empty_caption_naming_the_flag(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="a caption", ext=".txt")
    _img(tmp_path / "i" / "1.png", caption="own caption")
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n")
    assert [(e.path.name, e.caption) for e in plan.entries] == [("0.png", ""), ("1.png", "own caption")]
    assert plan.warnings == [
        f"{tmp_path / 'i'}: 1 of 2 images has no .caption caption file but a .txt file beside it, so it trains on "
        "an empty caption; set --caption_extension=.txt (or caption_extension = \".txt\" in the dataset TOML)"]


def test_a_folder_without_class_tokens_and_uncaptioned_images_trains_on_empty_captions_with_a_warning(tmp_path):
    root = tmp_path / "train"
    _img(root / "5" / "a.png")                         # kohya: "5" is 5 repeats and no class tokens
    _img(root / "5" / "b.png", caption="b's caption")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=root, resolution=(64, 64)))
    assert [(e.path.name, e.num_repeats, e.caption) for e in plan.entries] == [("a.png", 5, ""), ("b.png", 5, "b's caption")]
    assert plan.warnings == [
        f"{(root / '5').absolute()}: 1 image has no .caption caption file and the subset has no class_tokens (a.png); "
        "it trains on an empty caption, as in kohya; add caption files or set class_tokens"]


# ---------------------------------------------------------------- folder convention

def test_train_data_dir_folder_convention(tmp_path):
    root = tmp_path / "train"
    _img(root / "3_my_char" / "a.png")
    _img(root / "3_my_char" / "b.png", caption="own caption")
    _img(root / "1_other" / "c.png")
    _img(root / "misc" / "d.png")
    _img(root / "0_zero" / "e.png")
    _img(root / "loose.png")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=root, resolution=(64, 64)))
    assert [(e.path.name, e.num_repeats, e.caption) for e in plan.entries] == [
        ("c.png", 1, "other"), ("a.png", 3, "my_char"), ("b.png", 3, "own caption"),
    ]
    assert plan.num_train_images == 7 and plan.batches_per_epoch == 7
    joined = " | ".join(plan.warnings)
    assert "'misc'" in joined and "'0_zero'" in joined and "10_spyke" in joined
    assert any("directly inside" in w and "ignored" in w for w in plan.warnings)   # loose.png
    assert dataset_dirs_metadata(plan) == {"1_other": {"n_repeats": 1, "img_count": 1},
                                            "3_my_char": {"n_repeats": 3, "img_count": 2}}


def test_train_data_dir_without_subfolders(tmp_path):
    _img(tmp_path / "flat" / "a.png", caption="c")
    with pytest.raises(DatasetError, match="subfolders"):
        load_dataset_plan(DatasetArgs(train_data_dir=tmp_path / "flat", resolution=(64, 64)))
    with pytest.raises(DatasetError, match="--dataset_config"):
        load_dataset_plan(DatasetArgs())


# ---------------------------------------------------------------- regularisation

def test_reg_images_repeated_to_match_train(tmp_path):
    for i in range(4):
        _img(tmp_path / "train" / "2_sks" / f"{i}.png")
    for i in range(3):
        _img(tmp_path / "reg" / "1_dog" / f"{i}.png")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=tmp_path / "train", reg_data_dir=tmp_path / "reg",
                                         resolution=(64, 64)))
    reg = [e for e in plan.entries if e.is_reg]
    assert [e.num_repeats for e in reg] == [3, 3, 2]          # kohya: +1 round-robin until 8
    assert plan.num_train_images == 8 and plan.num_reg_images == 3
    assert plan.num_samples == 16 and plan.batches_per_epoch == 16
    assert reg_dataset_dirs_metadata(plan) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    assert set(tag_frequency(plan)) == {"2_sks", "1_dog"}
    reg_ids = {s for s in range(plan.num_samples) if plan.entries[plan.sample_to_entry(s)].is_reg}
    batch = plan.load_batch(sorted(reg_ids)[:1] + [0], random.Random(0))
    assert batch.is_reg.tolist() == [True, False] and batch.is_reg.dtype == torch.bool


def test_surplus_reg_images_are_cut(tmp_path):
    _img(tmp_path / "t" / "0.png")
    _img(tmp_path / "t" / "1.png")
    for i in range(5):
        _img(tmp_path / "r" / f"{i}.png")
    plan = _plan_toml(tmp_path, """
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "t"
  class_tokens = "sks"
  [[datasets.subsets]]
  image_dir = "r"
  class_tokens = "dog"
  is_reg = true
""")
    reg = [e for e in plan.entries if e.is_reg]
    assert [e.path.name for e in reg] == ["0.png", "1.png"] and all(e.num_repeats == 1 for e in reg)
    assert plan.num_reg_images == 5 and plan.num_samples == 4
    assert any("3 of 5" in w for w in plan.warnings)


# ---------------------------------------------------------------- buckets

def test_bucket_resolutions_match_kohya():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (384, 640) in resos and (640, 384) in resos
    assert (256, 1024) in resos and (1024, 256) in resos
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert resos == sorted(resos) and len(resos) == len(set(resos))
    assert make_bucket_resolutions((128, 128), 64, 256, 64) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


def test_bucket_selection_nearest_aspect_then_cover_and_crop(tmp_path):
    sel = BucketSelector((128, 128), enable_bucket=True, min_size=64, max_size=256, steps=64)
    c = sel.select(160, 64)                 # ar 2.5: nearest is 192x64 (ar 3)
    assert c.reso == (192, 64) and c.resized_size == (192, 77)
    c = sel.select(100, 70)                 # ar 1.43: nearest is square, upscaled to cover
    assert c.reso == (128, 128) and c.resized_size == (183, 128)
    one = BucketSelector((64, 64), enable_bucket=False)
    assert one.select(160, 64).reso == (64, 64) and one.select(160, 64).resized_size == (160, 64)

    _img(tmp_path / "i" / "wide.png", 160, 64, caption="w")
    _img(tmp_path / "i" / "sq.png", 64, 64, caption="s")
    plan = _plan_toml(tmp_path, "[general]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n"
                                "[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = \"i\"\n")
    assert set(plan.buckets) == {(128, 128), (192, 64)}
    wide = next(i for i, e in enumerate(plan.entries) if e.path.name == "wide.png")
    t = plan.load_image(wide)
    assert t.shape == (3, 64, 192) and t.dtype == torch.float32
    info = bucket_info(plan)
    assert sorted(tuple(b["resolution"]) for b in info["buckets"].values()) == [(128, 128), (192, 64)]


def test_bucket_no_upscale_never_enlarges_a_small_image(tmp_path):
    sel = BucketSelector((128, 128), enable_bucket=True, no_upscale=True, steps=32)
    c = sel.select(100, 70)                 # smaller than the area: never upscaled
    assert c.resized_size == (100, 70) and c.reso == (96, 64)
    c = sel.select(200, 100)                # larger: scaled down to ~128*128 area
    assert c.resized_size == (128, 64) and c.reso == (128, 64)
    c = sel.select(1920, 1080)
    assert c.resized_size[0] < 1920 and c.reso[0] * c.reso[1] <= 128 * 128
    assert c.reso[0] <= c.resized_size[0] and c.reso[1] <= c.resized_size[1]
    assert c.reso[0] % 32 == 0 and c.reso[1] % 32 == 0

    _img(tmp_path / "i" / "small.png", 100, 70, caption="s")
    _img(tmp_path / "i" / "big.png", 300, 300, caption="b")
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 128\nenable_bucket = true\nbucket_no_upscale = true\n"
                                "bucket_reso_steps = 32\n[[datasets.subsets]]\nimage_dir = \"i\"\n")
    by_name = {e.path.name: e for e in plan.entries}
    assert by_name["small.png"].bucket == (96, 64) and by_name["small.png"].resized_size == (100, 70)
    assert by_name["big.png"].bucket == (128, 128)
    assert plan.load_image(list(plan.entries).index(by_name["small.png"])).shape == (3, 64, 96)


def test_no_bucket_resizes_everything_to_resolution(tmp_path):
    _img(tmp_path / "i" / "a.png", 160, 64, caption="a")
    _img(tmp_path / "i" / "b.png", 50, 90, caption="b")
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = [64, 32]\n[[datasets.subsets]]\nimage_dir = \"i\"\n")
    assert list(plan.buckets) == [(64, 32)]
    batch = plan.load_batch([0, 1], random.Random(0))
    assert batch.pixel_values.shape == (2, 3, 32, 64) and batch.bucket == (64, 32)


# ---------------------------------------------------------------- loading

def test_load_batch_shapes_range_flip_and_captions(tmp_path):
    _img(tmp_path / "i" / "0.png", 64, 64, color=(255, 255, 255), caption="keep, b, c, d, e, f")
    _img(tmp_path / "i" / "1.png", 64, 64, color=(0, 0, 0), caption="keep, b, c, d, e, f")
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\n"
                                "image_dir = \"i\"\nnum_repeats = 4\nflip_aug = true\nshuffle_caption = true\n"
                                "keep_tokens = 1\n")
    ids = plan.epoch_batches(0, seed=1)
    assert len(ids) == 4
    seen_flips, seen_orders = set(), set()
    for k in range(12):
        b = plan.load_batch(ids[k % 4], random.Random(k))
        assert b.pixel_values.shape == (2, 3, 64, 64) and b.pixel_values.dtype == torch.float32
        assert b.pixel_values.min() >= -1 and b.pixel_values.max() <= 1
        assert b.is_reg.tolist() == [False, False]
        for j, ei in enumerate(b.entry_indices):
            expect = plan.load_image(ei, flip=b.flipped[j])
            assert torch.equal(b.pixel_values[j], expect)
            assert torch.equal(plan.load_image(ei, flip=True), torch.flip(plan.load_image(ei), dims=[2]))
        for cap in b.captions:
            tags = cap.split(", ")
            assert tags[0] == "keep" and sorted(tags) == sorted("keep, b, c, d, e, f".split(", "))
            seen_orders.add(cap)
        seen_flips.update(b.flipped)
    assert seen_flips == {True, False} and len(seen_orders) > 1
    # same rng seed, same batch → identical result
    b1, b2 = plan.load_batch(ids[0], random.Random(3)), plan.load_batch(ids[0], random.Random(3))
    assert b1.captions == b2.captions and b1.flipped == b2.flipped and torch.equal(b1.pixel_values, b2.pixel_values)
    white = plan.load_image(0)
    assert white[:, 10, 10].tolist() == [1.0, 1.0, 1.0] and white[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_shuffle_caption_keeps_the_leading_tokens_and_empty_tags_as_kohya():
    from engine.dataset_config import SubsetSpec

    def sub(**kw):
        return SubsetSpec(image_dir=Path("i"), num_repeats=1, caption_extension=".txt", class_tokens=None,
                          is_reg=False, flip_aug=False, where="w", **{"shuffle_caption": False, "keep_tokens": 2, **kw})
    rng = random.Random(0)
    assert process_caption("a,b , c", sub(), rng) == "a,b , c"   # no shuffle: untouched
    out = process_caption("a, b, , c, d", sub(shuffle_caption=True), rng)
    # kohya keeps the empty tag between the two commas
    assert out.startswith("a, b, ") and sorted(out.split(", ")) == ["", "a", "b", "c", "d"]


# ---------------------------------------------------------------- errors

def test_toml_type_errors_name_the_field(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="c")
    sub = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n"
    msg = _error(tmp_path, sub + "num_repeats = \"ten\"\n")
    assert "ds.toml" in msg and "subsets[0]" in msg and "num_repeats" in msg and "integer" in msg
    msg = _error(tmp_path, sub + "flip_aug = \"yes\"\n")
    assert "flip_aug" in msg and "true or false" in msg
    msg = _error(tmp_path, sub + "num_repeats = true\n")
    assert "num_repeats" in msg and "integer" in msg
    msg = _error(tmp_path, sub.replace("resolution = 64", "resolution = [64]"))
    assert "resolution" in msg and "[width, height]" in msg
    msg = _error(tmp_path, sub + "num_repeats = 0\n")
    assert "num_repeats" in msg and "at least 1" in msg
    msg = _error(tmp_path, "[general]\nbatch_size = 1.5\n" + sub)
    assert "general" in msg and "batch_size" in msg


def test_a_misspelt_or_misplaced_dataset_toml_key_names_the_key_and_the_fix(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="c")
    sub = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\n"
    msg = _error(tmp_path, sub + "num_repeat = 3\n")
    assert "num_repeat" in msg and "ds.toml" in msg and "did you mean num_repeats" in msg
    msg = _error(tmp_path, sub + "resolution = 64\n")
    assert "dataset option" in msg
    msg = _error(tmp_path, "[general]\nimage_dir = \"i\"\n" + sub)
    assert "image_dir" in msg and "subset option" in msg
    msg = _error(tmp_path, "[genral]\n" + sub)
    assert "genral" in msg and "[general]" in msg
    msg = _error(tmp_path, "[general]\nalpha_mask = true\n" + sub)
    assert "alpha_mask" in msg and "subset option" in msg
    msg = _error(tmp_path, "[[datasets]]\nresolution = 64\nnetwork_multiplier = 2.0\n[[datasets.subsets]]\n"
                           "image_dir = \"i\"\n")
    assert "network_multiplier" in msg and "not supported" in msg
    assert len(_plan_toml(tmp_path, sub + "alpha_mask = false\ncaption_dropout_rate = 0.0\n").entries) == 1
    msg = _error(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n")
    assert "image_dir is missing" in msg
    msg = _error(tmp_path, "[[datasets]]\nresolution = 64\n")
    assert "datasets.subsets" in msg
    msg = _error(tmp_path, "[[datasets]\n")
    assert "invalid TOML" in msg and "ds.toml" in msg


def test_a_folder_without_images_a_broken_image_or_a_missing_folder_is_one_line(tmp_path):
    sub = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"i\"\nclass_tokens = \"x\"\n"
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "notes.txt").write_text("not an image")
    msg = _error(tmp_path, sub)
    assert "no images" in msg and str(tmp_path / "i") in msg
    _img(tmp_path / "i" / "ok.PNG")                      # extensions are case-insensitive
    assert len(_plan_toml(tmp_path, sub).entries) == 1
    (tmp_path / "i" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    msg = _error(tmp_path, sub)
    assert "broken.jpg" in msg and "replace or delete" in msg
    shutil.rmtree(tmp_path / "i")
    msg = _error(tmp_path, sub)
    assert "image_dir" in msg and "not found" in msg


def test_bucket_sizes_kohya_refuses_are_refused_and_the_ones_it_rounds_are_rounded(tmp_path):
    _img(tmp_path / "i" / "0.png", caption="c")
    sub = "[[datasets.subsets]]\nimage_dir = \"i\"\n"
    msg = _error(tmp_path, "[[datasets]]\nresolution = 128\nenable_bucket = true\n" + sub)
    assert "min_bucket_reso" in msg and "128" in msg      # kohya: min bucket must be <= resolution
    # kohya trains a resolution that is not a multiple of 8 as given
    assert _plan_toml(tmp_path, "[[datasets]]\nresolution = 60\n" + sub).entries[0].bucket == (60, 60)
    plan = _plan_toml(tmp_path, "[[datasets]]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 100\n"
                                "max_bucket_reso = 200\n" + sub)
    assert plan.datasets[0].min_bucket_reso == 64 and plan.datasets[0].max_bucket_reso == 256
    assert any("rounded down to 64" in w for w in plan.warnings)


def test_two_datasets_keep_their_own_batch_size_and_buckets(tmp_path):
    for i in range(3):
        _img(tmp_path / "i" / f"{i}.png", caption="Tag, other")
    plan = _plan_toml(tmp_path, """
[general]
resolution = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "i"
  num_repeats = 2
[[datasets]]
batch_size = 4
  [[datasets.subsets]]
  image_dir = "i"
  num_repeats = 3
""")
    assert len(plan.entries) == 6 and plan.num_train_images == 15
    assert plan.batches_per_epoch == 3 + 3        # ceil(6/2) + ceil(9/4), same 64x64 bucket kept apart
    assert list(plan.buckets) == [(64, 64)]
    for batch in plan.epoch_batches(2, seed=0):
        datasets = {plan.entries[plan.sample_to_entry(s)].dataset_index for s in batch}
        assert len(datasets) == 1
        assert len(batch) <= (2 if datasets == {0} else 4)
    # a folder counted by an earlier dataset is not counted again (kohya)
    assert tag_frequency(plan) == {"i": {"tag": 3, "other": 3}}


def test_headless_run_prints_the_caption_extension_warning(tiny_cache, tmp_path):
    import io

    from engine.config import TrainConfig
    from engine.headless import run_headless

    root = _txt_captioned(tmp_path / "train", n=2)
    config = TrainConfig(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"), train_data_dir=str(root),
                         output_dir=str(tmp_path / "out"), output_name="cap", resolution="64", max_train_steps=1,
                         network_dim=4, mixed_precision="no", seed=1).validate()
    out = io.StringIO()
    assert run_headless(config, out=out) == 0, out.getvalue()
    warnings = [line for line in out.getvalue().splitlines() if "--caption_extension" in line]
    assert warnings == [
        f"warning: {root.absolute() / '2_spyke'}: 2 of 2 images have no .caption caption file but a .txt file "
        "beside them, so they train on the class tokens 'spyke' alone; set --caption_extension=.txt "
        "(or caption_extension = \".txt\" in the dataset TOML)"
    ]
