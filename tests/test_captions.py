"""kohya's caption processing and image augmentations, each against a hand computation of kohya's rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.augment import color_aug, crop_offsets, face_crop, hue_shift
from engine.captions import process_caption
from engine.dataset import DatasetArgs, load_dataset_plan
from engine.dataset_config import SubsetSpec
from engine.errors import ConfigError


def sub(**kw) -> SubsetSpec:
    base = dict(image_dir=Path("i"), num_repeats=1, caption_extension=".txt", class_tokens=None, shuffle_caption=False,
                keep_tokens=0, is_reg=False, flip_aug=False, where="w")
    return SubsetSpec(**(base | kw))


def test_prefix_suffix_and_secondary_separator():
    s = sub(caption_prefix="pre", caption_suffix="post", secondary_separator=";;;")
    assert process_caption("a;;;b, c", s, random.Random(0)) == "pre a,b, c post"


def test_caption_dropout_rate_uses_one_draw_of_the_rng():
    s = sub(caption_dropout_rate=0.5)
    draws = [random.Random(seed).random() for seed in range(6)]
    got = [process_caption("x, y", s, random.Random(seed)) for seed in range(6)]
    assert got == ["" if d < 0.5 else "x, y" for d in draws]


def test_caption_dropout_every_n_epochs_drops_on_multiples_of_n():
    s = sub(caption_dropout_every_n_epochs=2)
    assert [process_caption("x", s, random.Random(0), epoch=e) for e in (1, 2, 3, 4)] == ["x", "", "x", ""]


def test_tag_dropout_after_shuffle_keeps_fixed_tags():
    s = sub(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.5)
    ref = random.Random(7)
    flex = ["b", "c", "d", "e"]
    ref.shuffle(flex)
    flex = [t for t in flex if ref.random() >= 0.5]
    assert process_caption("a, b, c, d, e", s, random.Random(7)) == ", ".join(["a"] + flex)


def test_keep_tokens_separator_fixes_head_and_tail():
    s = sub(shuffle_caption=True, keep_tokens_separator="|||")
    ref = random.Random(3)
    flex = ["c", "d", "e"]
    ref.shuffle(flex)
    assert process_caption("a, b ||| c, d, e ||| z", s, random.Random(3)) == ", ".join(["a", "b"] + flex + ["z"])


def test_wildcards_pick_a_line_then_each_choice_and_keep_escaped_braces():
    s = sub(enable_wildcard=True)
    ref = random.Random(5)
    line = ref.choice(["{red|blue} cat {{x}}", "dog"])
    if line != "dog":
        line = ref.choice(["red", "blue"]) + " cat {x}"
    assert process_caption("{red|blue} cat {{x}}\ndog", s, random.Random(5)) == line
    assert process_caption("one\ntwo", sub(), random.Random(5)) == "one"   # without wildcards: the first line


def test_token_warmup_keeps_floor_of_step_fraction_of_tags():
    s = sub(token_warmup_min=1, token_warmup_step=10)
    # 5 tags: floor(step * (5 - 1) / 10) + 1
    assert [process_caption("a, b, c, d, e", s, random.Random(0), step=st) for st in (0, 5, 9, 10)] == \
        ["a", "a, b, c", "a, b, c, d", "a, b, c, d, e"]
    ratio = sub(token_warmup_min=1, token_warmup_step=0.5)   # a ratio of the run's 20 steps -> 10
    assert process_caption("a, b, c, d, e", ratio, random.Random(0), step=5, max_train_steps=20) == "a, b, c"


# OpenCV's own output (opencv-python-headless 5.0, cvtColor BGR2HSV / shift / HSV2BGR) for this input
_HUE_IN = [[[255, 228, 34], [121, 243, 189], [6, 131, 102]], [[168, 82, 193], [187, 150, 81], [243, 205, 24]],
           [[236, 8, 246], [164, 231, 36], [210, 111, 172]], [[210, 174, 176], [218, 242, 169], [114, 205, 63]]]
_HUE_OUT = [[[240, 255, 34], [121, 243, 215], [6, 131, 127]], [[189, 82, 193], [187, 173, 81], [236, 243, 24]],
            [[246, 8, 206], [127, 231, 36], [210, 111, 151]], [[210, 179, 174], [203, 242, 169], [86, 205, 63]]]


def test_hue_shift_matches_opencv():
    assert hue_shift(np.array(_HUE_IN, dtype=np.uint8), -5.2).tolist() == _HUE_OUT


def test_color_aug_draws_in_kohyas_order():
    img = np.array(_HUE_IN, dtype=np.uint8)
    for seed in range(40):
        ref = random.Random(seed)
        if ref.random() <= 0.33:
            if ref.random() > 0.5:
                want = hue_shift(img, ref.uniform(-8, 8))
            else:
                want = np.clip(img.astype(np.float64) ** ref.uniform(0.95, 1.05), 0, 255).astype(np.uint8)
        else:
            want = img
        assert np.array_equal(color_aug(img, random.Random(seed)), want)


def test_random_crop_offsets_are_randint_of_the_overhang_width_first():
    ref = random.Random(1)
    assert crop_offsets((80, 70), (64, 64), True, random.Random(1)) == (ref.randint(0, 16), ref.randint(0, 6))
    assert crop_offsets((80, 70), (64, 64), False, None) == (8, 3)


def test_face_crop_centres_the_face_at_the_fixed_scale():
    im = Image.fromarray(np.arange(128 * 128 * 3, dtype=np.uint32).reshape(128, 128, 3).astype(np.uint8))
    # face 32 px at (100, 90); range (2, 2): scale = min(1, max(64/128, 64/(32*2))) = 1 -> no resize
    out = face_crop(im, (100, 90, 32, 32), (64, 64), (2.0, 2.0), False, random.Random(0))
    # top = clamp(90 - 32, 0, 64) = 58, left = clamp(100 - 32, 0, 64) = 64
    assert np.array_equal(out, np.array(im)[58:122, 64:128])


def _write(path: Path, color, caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def test_dataset_toml_caption_keys_reach_the_batch(tmp_path):
    _write(tmp_path / "i" / "0.png", (10, 20, 30), "a, b, c")
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\ncaption_prefix = "sks"\n[[datasets]]\nresolution = 64\n'
                    '[[datasets.subsets]]\nimage_dir = "i"\ncaption_tag_dropout_rate = 1.0\nkeep_tokens = 1\n')
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml))
    assert plan.load_batch([0], random.Random(0)).captions == ["sks a"]


def test_none_use_foldername_extension_trains_on_the_folder_tokens(tmp_path):
    _write(tmp_path / "train" / "5_ohwx man" / "0.png", (1, 2, 3), "unused caption")
    plan = load_dataset_plan(DatasetArgs(train_data_dir=tmp_path / "train", resolution=(64, 64),
                                         caption_extension=".none-use-foldername"))
    assert [e.caption for e in plan.entries] == ["ohwx man"] and plan.entries[0].num_repeats == 5


def test_metadata_file_captions_join_caption_and_tags(tmp_path):
    _write(tmp_path / "img" / "a.png", (1, 2, 3))
    _write(tmp_path / "img" / "b.jpg", (4, 5, 6))
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "a photo", "tags": "red, cat"},
                                                   "b.jpg": {"tags": "dog"}}))
    toml = tmp_path / "ds.toml"
    toml.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = "meta.json"\n'
                    'image_dir = "img"\n')
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml))
    assert [(e.path.name, e.caption) for e in plan.entries] == [("a.png", "a photo,red, cat"), ("b.jpg", "dog")]


def test_random_crop_pixels_in_the_batch(tmp_path):
    img = tmp_path / "i" / "0.png"
    img.parent.mkdir()
    arr = (np.arange(64 * 96 * 3) % 251).astype(np.uint8).reshape(64, 96, 3)
    Image.fromarray(arr).save(img)
    img.with_suffix(".txt").write_text("x")
    toml = tmp_path / "ds.toml"
    toml.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "i"\ncaption_extension = ".txt"\n'
                    'random_crop = true\n')
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml))
    left = random.Random(4).randint(0, 32)
    want = torch.from_numpy(arr[:, left:left + 64].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(plan.load_batch([0], random.Random(4)).pixel_values[0], want)


def test_cache_latents_with_color_aug_is_refused(tmp_path):
    from engine.config import TrainConfig
    from engine.plan import check_latent_caching

    _write(tmp_path / "train" / "1_x" / "0.png", (1, 2, 3))
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path / "train"), resolution="64",
                      color_aug=True, cache_latents=True)
    from engine.plan import dataset_args
    plan = load_dataset_plan(dataset_args(cfg))
    with pytest.raises(ConfigError, match="--cache_latents cannot be used with color_aug"):
        check_latent_caching(cfg, plan, [])


def test_latent_disk_cache_round_trip_and_key(tmp_path):
    from engine.latent_cache import LatentDiskCache, cache_key

    cache = LatentDiskCache(tmp_path / "c")
    k = cache_key("abc", (64, 64), (64, 80), False, "vae1")
    assert k != cache_key("abc", (64, 64), (64, 80), True, "vae1") != cache_key("abc", (64, 64), (64, 80), False, "v2")
    assert cache.get(k) is None
    t = torch.arange(8.0).reshape(2, 2, 2)
    cache.put(k, t)
    assert torch.equal(LatentDiskCache(tmp_path / "c").get(k), t)
