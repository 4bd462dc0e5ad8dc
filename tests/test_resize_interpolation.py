"""kohya's --resize_interpolation: how an image (and its loss mask) is resized to its bucket, the
dataset TOML's resize_interpolation at subset, dataset and [general] level, the latent cache key
and the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.cli_args import make_parser, parse_train_args
from engine.dataset import DatasetArgs, load_dataset_plan
from engine.errors import ConfigError, DatasetError
from engine.resize import FLAG_CHOICES, method, resize


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def _folder(tmp_path: Path, w: int, h: int, name: str = "a.png") -> Path:
    sub = tmp_path / "img" / "1_thing"
    sub.mkdir(parents=True, exist_ok=True)
    _noise(w, h).save(sub / name)
    (sub / name).with_suffix(".caption").write_text("thing", encoding="utf-8")
    return tmp_path / "img"


# ----------------------------------------------------------------------------- the resize itself
def test_default_is_area_when_no_side_grows_and_lanczos_otherwise():
    assert method(None, (200, 100), (100, 50)) == "area"
    assert method(None, (100, 50), (100, 50)) == "area"
    assert method(None, (100, 50), (200, 100)) == "lanczos"
    assert method(None, (200, 40), (100, 50)) == "lanczos"      # one side grows: kohya picks lanczos
    assert method("nearest", (200, 100), (100, 50)) == "nearest"


@pytest.mark.parametrize("name,library", [
    ("area", ("cv2", cv2.INTER_AREA)), ("nearest", ("cv2", cv2.INTER_NEAREST_EXACT)),
    ("bilinear", ("cv2", cv2.INTER_LINEAR)), ("linear", ("cv2", cv2.INTER_LINEAR)),
    ("bicubic", ("cv2", cv2.INTER_CUBIC)), ("cubic", ("cv2", cv2.INTER_CUBIC)),
    ("lanczos", ("pil", Image.Resampling.LANCZOS)), ("box", ("pil", Image.Resampling.BOX)),
])
def test_each_method_is_the_library_call_kohya_makes(name, library):
    image = _noise(97, 61, seed=3)
    for target in ((40, 25), (150, 94)):          # down and up
        got = resize(image, target, name)
        which, flag = library
        want = (cv2.resize(np.array(image), target, interpolation=flag) if which == "cv2"
                else np.array(image.resize(target, flag)))
        assert got.shape == (target[1], target[0], 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), (name, target)


def test_methods_give_different_pixels_and_a_mask_keeps_its_values_under_nearest():
    image = _noise(90, 90, seed=5)
    outs = {name: resize(image, (37, 37), name) for name in ("area", "nearest", "bicubic", "lanczos")}
    assert len({o.tobytes() for o in outs.values()}) == 4
    binary = Image.fromarray((np.array(_noise(90, 90, seed=6, mode="L")) > 127).astype(np.uint8) * 255, "L")
    assert set(np.unique(resize(binary, (37, 37), "nearest"))) <= {0, 255}
    assert len(np.unique(resize(binary, (37, 37), "area"))) > 2


# ----------------------------------------------------------------------------- flag and config files
def _parse(argv: list[str]):
    return parse_train_args(make_parser("spyke-cockpit train", "test"), argv, notes=[])[1]


def test_the_flag_takes_kohyas_choices_and_refuses_box_as_kohya_does():
    for name in FLAG_CHOICES:
        assert _parse([f"--resize_interpolation={name}"]).resize_interpolation == name
    assert _parse([]).resize_interpolation is None
    with pytest.raises(ConfigError, match=r"^--resize_interpolation must be one of lanczos, .*area \(got 'box'\)$"):
        _parse(["--resize_interpolation=box"]).validate()


def test_a_kohya_config_file_sets_it_and_an_empty_string_is_unset(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[dataset]\nresize_interpolation = "bicubic"\n', encoding="utf-8")
    assert _parse([f"--config_file={cfg_file}"]).resize_interpolation == "bicubic"
    cfg_file.write_text('resize_interpolation = ""\n', encoding="utf-8")
    assert _parse([f"--config_file={cfg_file}"]).resize_interpolation is None


def test_dataset_toml_subset_over_dataset_over_general_over_the_flag(tmp_path):
    img = _folder(tmp_path, 80, 80)
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
resize_interpolation = "nearest"
[[datasets]]
resolution = 64
resize_interpolation = "bicubic"
  [[datasets.subsets]]
  image_dir = "{img / '1_thing'}"
  resize_interpolation = "box"
  [[datasets.subsets]]
  image_dir = "{img / '1_thing'}"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{img / '1_thing'}"
""", encoding="utf-8")
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml, resize_interpolation="area"))
    picked = [[s.resize_interpolation for s in ds.subsets] for ds in plan.datasets]
    assert picked == [["box", "bicubic"], ["nearest"]]
    assert [ds.resize_interpolation for ds in plan.datasets] == ["bicubic", "nearest"]
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img / "1_thing"}"\n',
                    encoding="utf-8")
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml, resize_interpolation="area"))
    assert plan.datasets[0].subsets[0].resize_interpolation == "area"


def test_a_bad_value_in_a_dataset_toml_is_one_line_naming_where(tmp_path):
    img = _folder(tmp_path, 80, 80)
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img / "1_thing"}"\n'
                    f'resize_interpolation = "lanczos4"\n', encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_dataset_plan(DatasetArgs(dataset_config=toml))
    msg = str(info.value)
    assert "\n" not in msg and "ds.toml" in msg and "resize_interpolation = 'lanczos4'" in msg and "box" in msg


# ----------------------------------------------------------------------------- the pixels trained on
@pytest.mark.parametrize("interpolation", [None, "nearest", "bicubic", "lanczos"])
def test_the_training_pixels_are_the_image_resized_with_the_chosen_method(tmp_path, interpolation):
    img = _folder(tmp_path, 150, 100)                       # 150x100 -> covers 64x64 at 96x64, crop 16 each side
    plan = load_dataset_plan(DatasetArgs(train_data_dir=img, resolution=(64, 64),
                                         resize_interpolation=interpolation))
    e = plan.entries[0]
    assert (e.resized_size, e.bucket) == ((96, 64), (64, 64))
    pixels = plan.load_image(0, flip=False)
    source = Image.open(img / "1_thing" / "a.png").convert("RGB")
    want = resize(source, (96, 64), interpolation)[:, 16:80]
    got = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.int16)
    assert np.abs(got - want.astype(np.int16)).max() <= 1
    assert plan.resize_method(0) == method(interpolation, (150, 100), (96, 64))


def test_the_latent_cache_key_names_the_method_actually_used():
    from engine.latent_cache import cache_key

    key = lambda how: cache_key("abc", (64, 64), (96, 64), False, "vae", how)  # noqa: E731
    assert key("area") != key("nearest") != key("lanczos")
    assert key("area") == key("area")


def test_an_explicit_method_equal_to_the_default_shares_the_cached_latents(tmp_path):
    img = _folder(tmp_path, 150, 100)
    default = load_dataset_plan(DatasetArgs(train_data_dir=img, resolution=(64, 64)))
    area = load_dataset_plan(DatasetArgs(train_data_dir=img, resolution=(64, 64), resize_interpolation="area"))
    cubic = load_dataset_plan(DatasetArgs(train_data_dir=img, resolution=(64, 64), resize_interpolation="bicubic"))
    assert default.resize_method(0) == area.resize_method(0) == "area" != cubic.resize_method(0)


def test_the_alpha_mask_is_resized_with_the_pixels_method(tmp_path):
    sub = tmp_path / "img" / "1_thing"
    sub.mkdir(parents=True)
    rgba = np.array(_noise(150, 100).convert("RGBA"))
    rgba[..., 3] = (np.array(_noise(150, 100, seed=9, mode="L")) > 127) * 255
    Image.fromarray(rgba, "RGBA").save(sub / "a.png")
    (sub / "a.caption").write_text("thing", encoding="utf-8")
    masks = {}
    for how in ("nearest", "area"):
        plan = load_dataset_plan(DatasetArgs(train_data_dir=tmp_path / "img", resolution=(64, 64), alpha_mask=True,
                                             masked_loss=True, resize_interpolation=how))
        masks[how] = plan.masks.plain(0)
        alpha = Image.fromarray(rgba[..., 3], "L")
        assert np.allclose(masks[how], resize(alpha, (96, 64), how)[:, 16:80] / 255.0)
    assert set(np.unique(masks["nearest"])) <= {0.0, 1.0} and len(np.unique(masks["area"])) > 2


# ----------------------------------------------------------------------------- metadata
def test_metadata_records_the_flag_and_each_dataset_and_subset_value(tmp_path):
    from engine.kohya.dataset_metadata import dataset_metadata
    from engine.kohya.metadata import build_metadata

    img = _folder(tmp_path, 80, 80)
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nresize_interpolation = "bilinear"\n[[datasets.subsets]]\n'
                    f'image_dir = "{img / "1_thing"}"\nresize_interpolation = "box"\n', encoding="utf-8")
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml, resize_interpolation="cubic"))
    meta = build_metadata({"resize_interpolation": "cubic",
                           **dataset_metadata(plan, from_dataset_config=True, gradient_accumulation_steps=1)})
    datasets = json.loads(meta["ss_datasets"])
    assert meta["ss_resize_interpolation"] == "cubic"
    assert datasets[0]["resize_interpolation"] == "bilinear"
    assert datasets[0]["subsets"][0]["resize_interpolation"] == "box"


def test_a_preset_toml_sets_it(tmp_path):
    from engine.config_io import build_config, to_toml

    preset = tmp_path / "p.toml"
    preset.write_text('[dataset]\nresize_interpolation = "nearest"\n', encoding="utf-8")
    cfg = build_config(preset)
    assert cfg.resize_interpolation == "nearest"
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg), encoding="utf-8")
    assert build_config(again).resize_interpolation == "nearest"
