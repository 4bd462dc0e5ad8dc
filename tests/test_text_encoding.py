"""--max_token_length: long captions in 75-token chunks, encoded one by one and joined as kohya does;
sample prompts as kohya's long-prompt pipeline encodes them; --weighted_captions: (word:1.3), (word) and
[word] in training captions weigh those tokens' hidden states, as kohya's tokenize_with_weights /
encode_tokens_with_weights do (no rescaling to the mean)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.text_encoding import caption_token_ids, encode_sample_prompts, weighted_caption_token_ids
from engine.tiny import _WORDS

LONG = ", ".join(_WORDS * 2)     # over 75 tokens and under 150 in the tiny tokenizer


@pytest.fixture(scope="module")
def base(tiny_cache):
    from engine.models import load_base_model

    return load_base_model(tiny_cache / "tiny-sd15")


def encode(base, captions, **cfg):
    """What a training step feeds the UNet for ``captions``."""
    from engine.train.step import TrainStep

    models = SimpleNamespace(tokenizer=base.tokenizer, te=base.text_encoder, device=torch.device("cpu"),
                             train_te=False)
    with torch.no_grad():
        return TrainStep(TrainConfig(**cfg), models, plan=None, seed=0).encode_prompts(captions)


def hidden(base, ids, clip_skip):
    te = base.text_encoder
    with torch.no_grad():
        out = te(ids[None], output_hidden_states=True)
        if clip_skip and clip_skip > 1:
            return getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-clip_skip])
        return out.last_hidden_state


def test_a_long_caption_is_two_chunks_encoded_one_by_one_and_joined_without_the_inner_bos_eos(base):
    tok = base.tokenizer
    full = tok(LONG, padding="max_length", max_length=152, truncation=True, return_tensors="pt").input_ids[0]
    assert 77 < len(tok(LONG).input_ids) < 152
    bos, eos = full[:1], full[-1:]
    first = torch.cat([bos, full[1:76], eos])
    second = torch.cat([bos, full[76:151], eos])
    assert torch.equal(caption_token_ids(tok, LONG, 150), torch.stack([first, second]))
    for clip_skip in (None, 2):
        h1, h2 = hidden(base, first, clip_skip), hidden(base, second, clip_skip)
        want = torch.cat([h1[:, :1], h1[:, 1:76], h2[:, 1:76], h2[:, 76:]], dim=1)
        got = encode(base, [LONG], max_token_length=150, clip_skip=clip_skip)
        assert got.shape == (1, 152, h1.shape[-1])
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_225_pads_a_short_caption_with_chunks_of_bos_and_eos_only(base):
    tok = base.tokenizer
    ids = caption_token_ids(tok, "spyke red", 225)
    words = tok("spyke red").input_ids[1:-1]
    assert ids.shape == (3, 77)
    assert ids[0].tolist() == [tok.bos_token_id] + words + [tok.eos_token_id] * (76 - len(words))
    assert ids[1].tolist() == ids[2].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 76
    assert encode(base, ["spyke red", LONG], max_token_length=225).shape[:2] == (2, 227)


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_75_and_no_max_token_length_keep_the_single_encoder_call_bit_for_bit(base, clip_skip):
    tok = base.tokenizer
    ids = tok([LONG, "spyke"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = base.text_encoder(ids, output_hidden_states=True)
    norm = getattr(base.text_encoder, "text_model", base.text_encoder).final_layer_norm
    want = norm(out.hidden_states[-2]) if clip_skip else out.last_hidden_state
    for length in (None, 75):
        assert torch.equal(encode(base, [LONG, "spyke"], max_token_length=length, clip_skip=clip_skip), want)


def test_a_long_sample_prompt_and_its_short_negative_are_whole_chunks_of_the_same_length(base):
    tok = base.tokenizer
    words = tok(LONG).input_ids[1:-1]
    padded = [tok.bos_token_id] + words + [tok.eos_token_id] * (151 - len(words))
    chunks = [torch.tensor([tok.bos_token_id] + padded[1 + 75 * i:76 + 75 * i] + [tok.eos_token_id])
              for i in range(2)]
    with torch.no_grad():
        cond, uncond = encode_sample_prompts(base.text_encoder, tok, [LONG, "blurry"], "cpu", 2)
    want = torch.cat([hidden(base, c, 2) for c in chunks], dim=1)
    assert cond.shape == uncond.shape == (1, 154, want.shape[-1])
    assert torch.allclose(cond, want, atol=1e-6, rtol=1e-5)
    negative = tok("blurry", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert torch.allclose(uncond[:, :77], hidden(base, negative, 2), atol=1e-6, rtol=1e-5)


def test_a_run_with_max_token_length_150_trains_a_step(tiny_cache, tmp_path):
    from engine.demo import prepare_demo
    from engine.tiny import generate_dataset
    from engine.trainer import Trainer

    data = generate_dataset(tmp_path / "data", num_images=1, num_repeats=1, resolution=64, seed=2)
    (data.image_dir / "img_000.caption").write_text(LONG)
    cfg = prepare_demo(root=tiny_cache, output_root=tmp_path / "out", dataset_config=str(data.dataset_toml),
                       resolution="64", max_train_epochs=None, max_train_steps=1, save_every_n_steps=None,
                       save_state=False, network_dim=4, network_alpha=2.0, seed=1, max_token_length=150)
    result = Trainer(cfg, sinks=[]).run()
    assert result.status == "completed" and len(result.losses) == 1
    from safetensors import safe_open

    with safe_open(str(result.final_path), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"


def test_the_memory_estimate_counts_the_text_encoder_activations_once_per_chunk():
    from dataclasses import replace

    from engine.fit.estimate import TE_ACT_PER_LAYER, TE_TOKENS, estimate
    from engine.fit.preflight import settings_for
    from engine.fit.shapes import ComponentSizes, ModelShapes

    one = settings_for(TrainConfig(resolution="64", gradient_checkpointing=False))
    three = settings_for(TrainConfig(resolution="64", gradient_checkpointing=False, max_token_length=225))
    assert (one.text_chunks, three.text_chunks) == (1, 3) and replace(one, text_chunks=3) == three
    te = {"hidden_size": 32, "num_hidden_layers": 2}
    shapes = ModelShapes(ComponentSizes(1000, 10), ComponentSizes(1000, 10), ComponentSizes(1000),
                         {"block_out_channels": [32, 64]}, {"block_out_channels": [32]}, te)
    extra = estimate(shapes, three).parts["activations"] - estimate(shapes, one).parts["activations"]
    assert extra == 2 * TE_TOKENS * 32 * 2 * TE_ACT_PER_LAYER * 4


@pytest.mark.parametrize("prompt, pieces", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("closing) and ] alone, a:b", [("closing) and ] alone, a:b", 1.0)]),
])
def test_sample_prompt_weights_follow_kohyas_bracket_syntax(prompt, pieces):
    from engine.sample.weights import parse_weights

    got = parse_weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in pieces]
    assert [w for _, w in got] == pytest.approx([w for _, w in pieces])


def test_a_weighted_sample_prompt_scales_its_words_states_and_keeps_their_mean(base):
    tok = base.tokenizer
    cat, dog = tok("cat").input_ids[1:-1], tok(" dog").input_ids[1:-1]
    ids = torch.tensor([tok.bos_token_id] + cat + dog + [tok.eos_token_id] * (76 - len(cat + dog)))
    plain = hidden(base, ids, 2)
    weights = torch.ones(77)
    weights[1:1 + len(cat)] = 1.5
    want = plain * weights[None, :, None]
    want = want * (plain.mean() / want.mean())
    with torch.no_grad():
        (got,) = encode_sample_prompts(base.text_encoder, tok, ["(cat:1.5) dog"], "cpu", 2)
        (unweighted,) = encode_sample_prompts(base.text_encoder, tok, ["cat dog"], "cpu", 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.mean(), unweighted.mean(), atol=1e-6)
    assert not torch.allclose(got, unweighted)


def test_a_bad_weight_fails_that_sample_prompt_in_one_line():
    from engine.sample.weights import parse_weights

    with pytest.raises(ValueError, match=r"prompt weight ':1\.2\.3\)' is not a number"):
        parse_weights("a (cat:1.2.3)")


# ----------------------------------------------------------------------------- --weighted_captions
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
