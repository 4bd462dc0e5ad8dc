"""--masked_loss: kohya's apply_masked_loss, masks from alpha_mask transparency and from
conditioning_data_dir images, moved with the pixels through crop and flip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from engine.dataset import DatasetArgs, load_dataset_plan
from engine.errors import DatasetError
from engine.train.losses import apply_masked_loss


def test_masked_loss_is_the_loss_times_the_area_shrunk_mask_averaged_over_every_element():
    loss = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1.0                  # top-left block fully on
    masks[0, 2:, 2:] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])   # bottom-right block a quarter on
    masks[1] = 0.5
    shrunk = torch.tensor([[[1.0, 0.0], [0.0, 0.25]], [[0.5, 0.5], [0.5, 0.5]]])
    want = (loss * shrunk[:, None]).sum(dim=[1, 2, 3]) / 16
    assert torch.allclose(apply_masked_loss(loss, masks).mean(dim=[1, 2, 3]), want)
    assert apply_masked_loss(loss, None) is loss


def _rgba(path, w, h):
    rgb = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    alpha = ((np.arange(w)[None, :] * 2 + np.arange(h)[:, None]) % 256).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    path.with_suffix(".txt").write_text("x")
    return rgb, alpha


def _toml(tmp_path, subset_lines, general=""):
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n{general}[[datasets]]\nresolution = 64\n'
                    f'[[datasets.subsets]]\nimage_dir = "i"\n{subset_lines}')
    return toml


@pytest.mark.parametrize("seed", [0, 4, 7])
def test_an_rgba_image_masks_with_its_alpha_through_the_random_crop_and_flip(tmp_path, seed):
    (tmp_path / "i").mkdir()
    rgb, alpha = _rgba(tmp_path / "i" / "0.png", 96, 64)
    plan = load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, "alpha_mask = true\nflip_aug = true\n"
                                                                          "random_crop = true\n")))
    batch = plan.load_batch([0], random.Random(seed))
    hand = random.Random(seed)
    flip = hand.random() < 0.5
    left = hand.randint(0, 32)
    mask = alpha[:, left:left + 64].astype(np.float32) / 255
    pixels = rgb[:, left:left + 64]
    if flip:
        mask, pixels = mask[:, ::-1], pixels[:, ::-1]
    assert batch.flipped == [flip]
    assert torch.equal(batch.masks[0], torch.from_numpy(mask.copy()))
    assert torch.equal(batch.pixel_values[0], torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_alpha_mask_leaves_the_rgb_pixels_as_they_were_and_an_opaque_image_gets_ones(tmp_path):
    (tmp_path / "i").mkdir()
    _rgba(tmp_path / "i" / "0.png", 80, 64)
    Image.new("RGB", (64, 64), (9, 8, 7)).save(tmp_path / "i" / "1.png")
    (tmp_path / "i" / "1.txt").write_text("y")
    masked = load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, ""), alpha_mask=True))
    plain = load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, "")))
    assert plain.load_batch([0], random.Random(0)).masks is None
    for i in (0, 1):
        a, b = masked.load_batch([i], random.Random(0)), plain.load_batch([i], random.Random(0))
        assert torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(masked.load_batch([1], random.Random(0)).masks, torch.ones(1, 64, 64))


def test_masked_loss_without_any_mask_source_warns_that_the_loss_is_not_masked(tmp_path):
    (tmp_path / "i").mkdir()
    _rgba(tmp_path / "i" / "0.png", 64, 64)
    plan = load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, ""), masked_loss=True))
    assert plan.masks is None and plan.load_batch([0], random.Random(0)).masks is None
    assert any(w.startswith("--masked_loss: no subset has alpha_mask or conditioning_data_dir") for w in plan.warnings)


def test_a_conditioning_image_masks_with_its_red_channel_under_the_centre_crop(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    _rgba(tmp_path / "i" / "0.png", 96, 64)
    red = (np.arange(96)[None, :].repeat(64, 0) * 2).astype(np.uint8)
    Image.fromarray(np.dstack([red, 255 - red, red // 2])).save(tmp_path / "m" / "0.jpg", quality=100)
    toml = _toml(tmp_path, 'conditioning_data_dir = "m"\n')
    with pytest.raises(DatasetError, match=r"conditioning_data_dir subsets .* need --masked_loss"):
        load_dataset_plan(DatasetArgs(dataset_config=toml))
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml, masked_loss=True))
    decoded = np.asarray(Image.open(tmp_path / "m" / "0.jpg").convert("RGB"))[:, 16:80, 0]
    want = torch.from_numpy(decoded.copy()).float().div(255)
    assert torch.allclose(plan.load_batch([0], random.Random(0)).masks[0], want, atol=1e-6)
    Image.new("RGB", (96, 64)).save(tmp_path / "m" / "stray.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) in conditioning_data_dir .* have no training image"):
        load_dataset_plan(DatasetArgs(dataset_config=toml, masked_loss=True))
    (tmp_path / "m" / "stray.png").unlink()
    (tmp_path / "m" / "0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"no conditioning image in .* for 1 image\(s\) \(0.png\)"):
        load_dataset_plan(DatasetArgs(dataset_config=toml, masked_loss=True))
    with pytest.raises(DatasetError, match=r"random_crop cannot be used with conditioning_data_dir"):
        load_dataset_plan(DatasetArgs(dataset_config=_toml(tmp_path, 'conditioning_data_dir = "m"\nrandom_crop = '
                                                                     'true\n'), masked_loss=True))


def test_a_training_step_masks_the_loss_of_a_batch_that_has_masks():
    import contextlib
    from types import SimpleNamespace

    from engine.config import TrainConfig
    from engine.train.step import TrainStep

    latents = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    pred = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    models = SimpleNamespace(device=torch.device("cpu"), unet=lambda noisy, t, hidden: SimpleNamespace(sample=pred),
                             accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    step = TrainStep(TrainConfig(), models, plan=None, seed=3)
    step.batch_latents = lambda batch: latents
    step.encode_prompts = lambda captions: None
    masks = torch.zeros(2, 32, 32)
    masks[:, :16] = 1.0                                  # the top half of every image
    batch = SimpleNamespace(captions=["a", "b"], is_reg=torch.tensor([False, False]), masks=masks)
    loss = float(step.loss(batch))
    noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    top = torch.zeros(1, 1, 4, 4)
    top[..., :2, :] = 1.0
    assert loss == pytest.approx(float(((pred - noise) ** 2 * top).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def clear_data(tmp_path_factory):
    from engine.tiny import generate_dataset

    data = generate_dataset(tmp_path_factory.mktemp("masked"), num_images=2, num_repeats=1, resolution=64, seed=4)
    for src in sorted(data.image_dir.glob("*.png")):
        im = Image.open(src).convert("RGBA")
        im.putalpha(0)                                   # fully transparent: nothing to learn
        im.save(src)
    return data.dataset_toml


def test_a_masked_run_on_transparent_images_has_zero_loss(tiny_cache, tmp_path, clear_data):
    from engine.demo import prepare_demo
    from engine.trainer import Trainer

    cfg = prepare_demo(root=tiny_cache, output_root=tmp_path, dataset_config=str(clear_data), resolution="64",
                       max_train_epochs=None, max_train_steps=2, save_every_n_steps=None, save_state=False,
                       network_dim=4, network_alpha=2.0, seed=3, masked_loss=True, alpha_mask=True,
                       cache_latents=True)
    result = Trainer(cfg, sinks=[]).run()
    assert result.status == "completed" and result.losses == [0.0, 0.0]
