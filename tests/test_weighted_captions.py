"""--weighted_captions: (word:1.3), (word) and [word] in training captions weigh those tokens' hidden
states, as kohya's tokenize_with_weights / encode_tokens_with_weights do (no rescaling to the mean)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.text_encoding import caption_token_ids, weighted_caption_token_ids
from engine.tiny import _WORDS


@pytest.fixture(scope="module")
def base(tiny_cache):
    from engine.models import load_base_model

    return load_base_model(tiny_cache / "tiny-sd15")


def encode(base, captions, **cfg):
    from engine.train.step import TrainStep

    models = SimpleNamespace(tokenizer=base.tokenizer, te=base.text_encoder, device=torch.device("cpu"),
                             train_te=False)
    with torch.no_grad():
        return TrainStep(TrainConfig(**cfg), models, plan=None, seed=0).encode_prompts(captions)


def pieces(tok, *words):
    return [tok(w).input_ids[1:-1] for w in words]


def test_weighted_tokens_are_the_pieces_tokens_with_their_weights_between_bos_and_eos_padding(base):
    tok = base.tokenizer
    a, cat, on, grass = pieces(tok, "a ", "cat", " on ", "grass")
    ids, weights = weighted_caption_token_ids(tok, "a (cat:1.5) on [grass]", None)
    body = a + cat + on + grass
    assert ids.shape == weights.shape == (1, 77)
    assert ids[0].tolist() == [tok.bos_token_id] + body + [tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body))
    want = [1.0] * len(a) + [1.5] * len(cat) + [1.0] * len(on) + [1 / 1.1] * len(grass)
    assert weights[0].tolist() == pytest.approx([1.0] + want + [1.0] * (76 - len(body)))


def test_a_caption_without_brackets_trains_on_exactly_the_unweighted_states(base):
    caption = "spyke, " + ", ".join(_WORDS[2:6])
    ids, weights = weighted_caption_token_ids(base.tokenizer, caption, None)
    assert torch.equal(ids, caption_token_ids(base.tokenizer, caption, None)) and bool((weights == 1).all())
    assert torch.equal(encode(base, [caption], weighted_captions=True), encode(base, [caption]))


def test_a_weighted_word_multiplies_its_states_and_leaves_the_others_unchanged(base):
    tok = base.tokenizer
    (cat,) = pieces(tok, "cat")
    plain = encode(base, ["cat dog"], clip_skip=2)
    got = encode(base, ["(cat:1.5) dog", "[cat] dog"], weighted_captions=True, clip_skip=2)
    factor = torch.ones(2, 77)
    factor[0, 1:1 + len(cat)] = 1.5
    factor[1, 1:1 + len(cat)] = 1 / 1.1
    assert torch.allclose(got, plain * factor[:, :, None], atol=1e-6, rtol=1e-5)


def test_with_max_token_length_150_the_weights_follow_their_tokens_into_the_second_chunk(base):
    tok = base.tokenizer
    words = ", ".join(_WORDS * 2)
    caption = f"{words}, (spyke:2.0)"
    ids, weights = weighted_caption_token_ids(tok, caption, 150)
    assert ids.shape == weights.shape == (2, 77)
    body = [t for p in pieces(tok, f"{words}, ", "spyke") for t in p]
    assert 75 < len(body) <= 150
    flat_w = torch.ones(152)
    flat_w[1 + len(body) - len(pieces(tok, "spyke")[0]):1 + len(body)] = 2.0
    assert torch.equal(weights[1, 1:76], flat_w[76:151]) and torch.equal(weights[0, 1:76], flat_w[1:76])
    assert bool((weights[:, 0] == 1).all() and (weights[:, 76] == 1).all())
    plain = encode(base, [f"{words}, spyke"], max_token_length=150)
    got = encode(base, [caption], max_token_length=150, weighted_captions=True)
    assert got.shape == (1, 152, plain.shape[-1])
    assert torch.allclose(got, plain * flat_w[None, :, None], atol=1e-6, rtol=1e-5)


def test_weighted_captions_parses_from_the_cli_a_preset_and_a_kohya_config_file(tmp_path):
    from engine.cli_args import make_parser, parse_train_args

    preset = tmp_path / "p.toml"
    preset.write_text("weighted_captions = true\n")
    kohya = tmp_path / "k.toml"
    kohya.write_text("[training]\nweighted_captions = true\n")
    for argv in (["--weighted_captions"], [str(preset)], [f"--config_file={kohya}"]):
        parser = make_parser("spyke-cockpit train", "test")
        assert parse_train_args(parser, argv, notes=[])[1].weighted_captions is True, argv
    assert TrainConfig().weighted_captions is False


def test_a_caption_whose_weight_is_not_a_number_stops_the_run_before_it_starts_naming_the_image(tiny_cache, tmp_path):
    from engine.demo import prepare_demo
    from engine.plan import plan_run
    from engine.tiny import generate_dataset

    data = generate_dataset(tmp_path / "data", num_images=2, num_repeats=1, resolution=64, seed=2)
    (data.image_dir / "img_001.caption").write_text("spyke, (red hat:1.2.3)")
    cfg = prepare_demo(root=tiny_cache, output_root=tmp_path / "out", dataset_config=str(data.dataset_toml),
                       resolution="64", max_train_epochs=None, max_train_steps=1, weighted_captions=True)
    with pytest.raises(ConfigError, match=r"^--weighted_captions: the caption of img_001\.\w+: prompt weight "
                                          r"':1\.2\.3\)' is not a number; "):
        plan_run(cfg)
    cfg.weighted_captions = False
    assert plan_run(cfg).dataset.entries                           # without the flag the brackets are plain text


def test_a_run_with_weighted_captions_trains_a_step_and_differs_from_the_unweighted_run(tiny_cache, tmp_path):
    from engine.demo import prepare_demo
    from engine.tiny import generate_dataset
    from engine.trainer import Trainer

    data = generate_dataset(tmp_path / "data", num_images=1, num_repeats=1, resolution=64, seed=2)
    (data.image_dir / "img_000.caption").write_text("(spyke:3.0), red hat")
    losses = []
    for weighted in (False, True):
        cfg = prepare_demo(root=tiny_cache, output_root=tmp_path / f"out{weighted}",
                           dataset_config=str(data.dataset_toml), resolution="64", max_train_epochs=None,
                           max_train_steps=1, save_every_n_steps=None, save_state=False, network_dim=4,
                           network_alpha=2.0, seed=1, weighted_captions=weighted)
        result = Trainer(cfg, sinks=[]).run()
        assert result.status == "completed"
        losses.append(result.losses[0])
    assert losses[0] != losses[1]
