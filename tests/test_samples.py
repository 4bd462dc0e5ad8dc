"""Sample images: kohya's prompt files, sampler names and file names, and drawing them."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.sample.naming import parse_sample_filename, sample_dir, sample_filename
from engine.sample.prompts import SamplePrompt, check_prompts_path, load_prompts
from engine.sample.samplers import SAMPLER_NAMES, build_scheduler, check_sampler

WHEN = time.struct_time((2026, 1, 2, 3, 4, 5, 4, 2, -1))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- prompt files


def test_txt_line_options_are_read_as_kohya(tmp_path):
    path = write(tmp_path, "p.txt", "a cat, masterpiece --n lowres, bad hands --w 640 --h 384 --d 42 --l 5.5 --s 12 --ss euler_a\n")
    loaded = load_prompts(path)
    assert loaded.problems == ()
    assert loaded.prompts == (SamplePrompt(
        index=0, prompt="a cat, masterpiece", negative_prompt="lowres, bad hands", width=640, height=384,
        seed=42, scale=5.5, steps=12, sampler="euler_a", where=f"{path}:1"),)


def test_txt_prompt_without_options_gets_kohyas_defaults(tmp_path):
    (p,) = load_prompts(write(tmp_path, "p.txt", "a dog\n")).prompts
    assert (p.width, p.height, p.steps, p.scale, p.seed, p.negative_prompt, p.sampler) == (
        512, 512, 30, 7.5, None, None, None)


def test_txt_skips_blank_lines_and_lines_starting_with_hash(tmp_path):
    path = write(tmp_path, "p.txt", "# a comment\n\nfirst\n   \n#second\n  # indented is a prompt in kohya\nthird\n")
    loaded = load_prompts(path)
    assert [(p.index, p.prompt, p.where) for p in loaded.prompts] == [
        (0, "first", f"{path}:3"), (1, "# indented is a prompt in kohya", f"{path}:6"), (2, "third", f"{path}:7")]


def test_txt_option_letters_are_case_insensitive(tmp_path):
    (p,) = load_prompts(write(tmp_path, "p.txt", "x --W 256 --H 320 --D 3 --S 4 --L 2 --N no\n")).prompts
    assert (p.width, p.height, p.seed, p.steps, p.scale, p.negative_prompt) == (256, 320, 3, 4, 2.0, "no")


def test_width_and_height_round_down_to_a_multiple_of_8_and_at_least_64(tmp_path):
    (p,) = load_prompts(write(tmp_path, "p.txt", "x --w 130 --h 20\n")).prompts
    assert (p.width, p.height) == (128, 64)


def test_steps_are_clamped_to_1_through_1000(tmp_path):
    loaded = load_prompts(write(tmp_path, "p.txt", "x --s 0\ny --s 5000\n"))
    assert [p.steps for p in loaded.prompts] == [1, 1000]


def test_options_kohya_reads_for_other_models_are_accepted_and_ignored(tmp_path):
    loaded = load_prompts(write(tmp_path, "p.txt", "x --g 3.5 --fs 3 --ctr 0.5 --rcfg 1 --w 256\n"))
    assert loaded.problems == ()
    assert loaded.prompts[0].width == 256


def test_bad_txt_lines_are_reported_with_file_and_line_and_the_others_kept(tmp_path):
    path = write(tmp_path, "p.txt", "good one\n"
                                    "x --w abc\n"
                                    "x --q 3\n"
                                    "x --l seven\n"
                                    "x --n\n"
                                    "x --ss warp_drive\n"
                                    "good two --d 5\n")
    loaded = load_prompts(path)
    assert [(p.index, p.prompt) for p in loaded.prompts] == [(0, "good one"), (6, "good two")]
    assert len(loaded.problems) == 5
    for lineno, problem, words in zip(range(2, 7), loaded.problems,
                                      ("--w 'abc' is not a whole number", "unknown option --q",
                                       "--l 'seven' is not a number", "--n needs a value", "'warp_drive'")):
        assert problem.startswith(f"{path}:{lineno}: "), problem
        assert words in problem and problem.endswith("prompt skipped") and "\n" not in problem


def test_toml_prompt_table_gives_defaults_to_each_subset(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
negative_prompt = "lowres"
width = 256
height = 320
scale = 6
sample_steps = 10

[[prompt.subset]]
prompt = "a cat"

[[prompt.subset]]
prompt = "a dog"
seed = 9
sample_sampler = "k_euler"
""")
    loaded = load_prompts(path)
    assert loaded.problems == ()
    assert loaded.prompts == (
        SamplePrompt(0, "a cat", "lowres", 256, 320, None, 6.0, 10, None, f"{path}: [[prompt.subset]] #1"),
        SamplePrompt(1, "a dog", "lowres", 256, 320, 9, 6.0, 10, "k_euler", f"{path}: [[prompt.subset]] #2"),
    )


def test_toml_bad_subset_is_reported_and_the_others_kept(tmp_path):
    path = write(tmp_path, "p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "ok"\n'
                                     '[[prompt.subset]]\nprompt = "x"\nwidht = 512\n'
                                     '[[prompt.subset]]\nprompt = "y"\nwidth = "big"\n')
    loaded = load_prompts(path)
    assert [p.prompt for p in loaded.prompts] == ["ok"]
    assert loaded.problems[0].startswith(f"{path}: [[prompt.subset]] #2: unknown key 'widht'")
    assert loaded.problems[1].startswith(f"{path}: [[prompt.subset]] #3: width 'big' must be a whole number")


@pytest.mark.parametrize("text, words", [
    ('[prompt\nprompt = "x"\n', "not valid TOML"),
    ('prompt = "x"\n', "has no [prompt] table"),
    ('[prompt]\nwidth = 512\n', "has no [[prompt.subset]] tables"),
])
def test_toml_file_without_kohyas_shape_is_one_problem(tmp_path, text, words):
    path = write(tmp_path, "p.toml", text)
    loaded = load_prompts(path)
    assert loaded.prompts == ()
    assert len(loaded.problems) == 1 and loaded.problems[0].startswith(f"{path}: ") and words in loaded.problems[0]


def test_json_list_holds_tables_and_prompt_lines(tmp_path):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a cat", "width": 256, "seed": 1, "scale": 4, "sample_steps": 8, "negative_prompt": "bad"},
        "a dog --h 320 --d 2",
        {"prompt": "x", "seed": -1},
    ]))
    loaded = load_prompts(path)
    assert loaded.prompts == (
        SamplePrompt(0, "a cat", "bad", 256, 512, 1, 4.0, 8, None, f"{path}: entry 1"),
        SamplePrompt(1, "a dog", None, 512, 320, 2, 7.5, 30, None, f"{path}: entry 2"),
    )
    assert loaded.problems == (f"{path}: entry 3: seed -1 must be a whole number ≥ 0; prompt skipped",)


@pytest.mark.parametrize("text, words", [("[{", "not valid JSON at line 1"), ('{"prompt": "x"}', "JSON list")])
def test_json_file_that_is_not_a_list_is_one_problem(tmp_path, text, words):
    loaded = load_prompts(write(tmp_path, "p.json", text))
    assert loaded.prompts == () and len(loaded.problems) == 1 and words in loaded.problems[0]


def test_missing_prompts_file_is_a_problem_not_an_exception(tmp_path):
    loaded = load_prompts(tmp_path / "gone.txt")
    assert loaded.prompts == ()
    assert loaded.problems == (f"{tmp_path / 'gone.txt'}: prompts file not found; create it or fix --sample_prompts",)


def test_prompts_flag_with_another_file_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--sample_prompts=.*prompts\.yaml: kohya reads \.txt, \.toml or \.json"):
        check_prompts_path(tmp_path / "prompts.yaml")
    assert check_prompts_path(tmp_path / "p.TXT") == tmp_path / "p.TXT"


# ---------------------------------------------------------------- samplers

_KOHYA_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler", "dpmsingle": "DPMSolverSinglestepScheduler",
    "k_lms": "LMSDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_kohya_sampler_name_builds_its_scheduler_with_kohyas_schedule(name):
    import diffusers.schedulers as schedulers

    scheduler = build_scheduler(name)
    module = {"LMSDiscreteScheduler": "scheduling_lms_discrete"}.get(_KOHYA_CLASSES[name])
    cls = getattr(getattr(schedulers, module), _KOHYA_CLASSES[name]) if module else getattr(schedulers, _KOHYA_CLASSES[name])
    assert isinstance(scheduler, cls)
    config = scheduler.config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    if name.startswith("dpmsolver"):
        assert config.algorithm_type == name
    if name == "ddim":
        assert config.clip_sample is True and config.steps_offset == 0


def test_sampler_names_are_kohyas_sixteen():
    assert set(SAMPLER_NAMES) == set(_KOHYA_CLASSES)


def test_unknown_sampler_is_one_config_error_line_listing_the_names():
    with pytest.raises(ConfigError) as err:
        check_sampler("k_dpmpp_2m")
    message = str(err.value)
    assert message.startswith("--sample_sampler must be one of ddim, pndm, lms,") and "k_dpm_2_a" in message
    assert "'k_dpmpp_2m'" in message and "\n" not in message


# ---------------------------------------------------------------- file names


def test_sample_file_name_at_a_step_with_a_seed():
    assert sample_filename("last", 0, step=10, seed=42, when=WHEN) == "last_000010_00_20260102030405_42.png"


def test_sample_file_name_at_an_epoch_end_without_a_seed():
    assert sample_filename("mylora", 3, step=120, epoch=2, when=WHEN) == "mylora_e000002_03_20260102030405.png"


def test_sample_file_name_without_output_name_starts_with_the_step():
    assert sample_filename(None, 12, step=1234567, when=WHEN) == "1234567_12_20260102030405.png"


def test_samples_go_to_the_sample_folder_of_output_dir(tmp_path):
    assert sample_dir(tmp_path) == tmp_path / "sample"


def test_sample_file_names_parse_back():
    name = parse_sample_filename("my_lora_v2_000400_01_20260102030405_7.png")
    assert (name.output_name, name.step, name.epoch, name.index, name.seed) == ("my_lora_v2", 400, None, 1, 7)
    name = parse_sample_filename("last_e000003_00_20260102030405.png")
    assert (name.output_name, name.step, name.epoch, name.seed) == ("last", None, 3, None)
    assert parse_sample_filename("last-000400.safetensors") is None


# ---------------------------------------------------------------- drawing on the tiny model


@pytest.fixture(scope="module")
def tiny_lora(tiny_cache):
    import torch

    from engine.lora import apply_lora
    from engine.models import load_base_model

    base = load_base_model(tiny_cache / "tiny-sd15")
    network = apply_lora(base.unet, base.text_encoder, dim=4, alpha=4)
    # The tiny model's ops are too small to gain from threads; on a shared CPU they only thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base, network
    torch.set_num_threads(threads)


def draw(tiny_lora, prompts, out, **kw):
    import torch

    from engine.sample.generate import generate_samples

    base, _ = tiny_lora
    args = dict(output_dir=out, output_name="last", step=10, device="cpu", dtype=torch.float32, clip_skip=2,
                sampler="ddim", default_seed=0)
    args.update(kw)
    return generate_samples(base.unet, base.text_encoder, base.vae, base.tokenizer, prompts, **args)


def png_text(path: Path) -> dict:
    from engine.sample.png import read_png_parameters

    return read_png_parameters(path)


def test_three_prompts_honour_negative_size_seed_and_steps(tiny_lora, tmp_path):
    from PIL import Image

    base, _ = tiny_lora
    prompts = load_prompts(write(tmp_path, "p.txt",
                                 "spyke red --n blue --w 64 --h 64 --d 7 --s 3\n"
                                 "spyke red --w 64 --h 64 --d 7 --s 3\n"
                                 "spyke sky --w 96 --h 64 --s 2\n")).prompts
    calls = []
    hook = base.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[-1]))
    try:
        results = draw(tiny_lora, prompts, tmp_path / "out")
    finally:
        hook.remove()
    assert [r.ok for r in results] == [True, True, True]
    files = sorted((tmp_path / "out" / "sample").iterdir())
    assert [f.name for f in files] == sorted(r.path.name for r in results) and len(files) == 3
    assert [re.sub(r"_\d{14}", "_T", r.path.name) for r in results] == [
        "last_000010_00_T_7.png", "last_000010_01_T_7.png", "last_000010_02_T.png"]
    assert [Image.open(r.path).size for r in results] == [(64, 64), (64, 64), (96, 64)]
    assert calls == [8] * 3 + [8] * 3 + [12] * 2  # one UNet call per step, latent width = width / 8
    assert png_text(results[0].path) == {"prompt": "spyke red", "negative_prompt": "blue", "seed": 7, "steps": 3,
                                         "scale": 7.5, "sampler": "ddim", "width": 64, "height": 64}
    assert results[0].path.read_bytes() != results[1].path.read_bytes()  # --n changed the image
    assert png_text(results[2].path)["seed"] == 2  # no --d: default_seed + index


def test_same_seed_gives_a_byte_identical_png(tiny_lora, tmp_path):
    prompts = load_prompts(write(tmp_path, "p.txt", "spyke --w 64 --h 64 --d 5 --s 2\n" * 2
                                 + "spyke --w 64 --h 64 --d 6 --s 2\n")).prompts
    first, second, other = draw(tiny_lora, prompts, tmp_path / "a")
    (again,) = draw(tiny_lora, prompts[:1], tmp_path / "b", sampler="euler_a")  # the prompt's seed, not the run's
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()
    assert png_text(again.path)["sampler"] == "euler_a"


def test_prompt_without_seed_draws_the_same_image_at_each_call(tiny_lora, tmp_path):
    (prompt,) = load_prompts(write(tmp_path, "p.txt", "spyke --w 64 --h 64 --s 2\n")).prompts
    (a,) = draw(tiny_lora, [prompt], tmp_path / "a", default_seed=123)
    (b,) = draw(tiny_lora, [prompt], tmp_path / "b", default_seed=123)
    assert a.seed == b.seed == 123 and a.path.read_bytes() == b.path.read_bytes()
    assert parse_sample_filename(a.path.name).seed is None  # kohya names only a prompt's own seed


def test_every_kohya_sampler_draws_an_image(tiny_lora, tmp_path):
    prompts = [SamplePrompt(i, "spyke", None, 64, 64, 1, 7.5, 4 if name == "pndm" else 3, name)
               for i, name in enumerate(SAMPLER_NAMES)]
    results = draw(tiny_lora, prompts, tmp_path)
    assert [(r.sampler, r.error) for r in results] == [(name, None) for name in SAMPLER_NAMES]


def test_pndm_with_fewer_than_4_steps_fails_with_the_fix(tiny_lora, tmp_path):
    path = write(tmp_path, "p.txt", "x --w 64 --h 64 --s 3 --ss pndm\n")
    (result,) = draw(tiny_lora, load_prompts(path).prompts, tmp_path / "out")
    assert result.error == f"{path}:1: sampler pndm needs at least 4 steps; write --s 4 or more"


def test_the_lora_being_trained_is_in_the_samples(tiny_lora, tmp_path):
    import torch

    _, network = tiny_lora
    prompt = [SamplePrompt(0, "spyke", None, 64, 64, 1, 7.5, 2)]
    (before,) = draw(tiny_lora, prompt, tmp_path / "a")
    saved = [m.up.detach().clone() for m in network.modules]
    try:
        with torch.no_grad():
            for m in network.modules:
                m.up.fill_(0.05)
        (after,) = draw(tiny_lora, prompt, tmp_path / "b")
    finally:
        with torch.no_grad():
            for m, up in zip(network.modules, saved):
                m.up.copy_(up)
    assert before.path.read_bytes() != after.path.read_bytes()


def test_clip_skip_takes_the_nth_last_hidden_state_through_the_final_norm(tiny_lora):
    import torch

    from engine.text_encoding import encode_sample_prompts

    base, _ = tiny_lora
    te = base.text_encoder

    def encode(text, clip_skip):
        return encode_sample_prompts(te, base.tokenizer, [text], "cpu", clip_skip)[0]

    with torch.no_grad():
        ids = base.tokenizer("spyke red", padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        norm = getattr(te, "text_model", te).final_layer_norm
        assert torch.equal(encode("spyke red", 2), norm(out.hidden_states[-2]))
        assert torch.equal(encode("spyke red", 1), out.last_hidden_state)


def test_sampling_leaves_rng_states_and_train_modes_as_they_were(tiny_lora, tmp_path):
    import numpy as np
    import torch

    base, _ = tiny_lora
    base.unet.train()
    base.text_encoder.train()
    base.text_encoder.encoder.layers[0].eval()  # a mix of modes must come back as it was
    base.vae.eval()
    modes = [m.training for part in (base.unet, base.text_encoder, base.vae) for m in part.modules()]
    # Something inside the models drawing from the global generators, as a dropout or a library might.
    hook = base.unet.register_forward_pre_hook(
        lambda m, args: (torch.rand(1), random.random(), np.random.rand()) and None)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        results = draw(tiny_lora, [SamplePrompt(0, "spyke", None, 64, 64, None, 7.5, 2)], tmp_path)
        assert results[0].ok
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert random.getstate() == py_state
        after = np.random.get_state()
        assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
        assert [m.training for part in (base.unet, base.text_encoder, base.vae) for m in part.modules()] == modes
    finally:
        hook.remove()
        base.unet.eval()
        base.text_encoder.eval()


def test_a_failing_prompt_is_a_failed_result_and_the_next_prompt_still_renders(tiny_lora, tmp_path):
    import torch

    base, _ = tiny_lora
    base.unet.train()

    def out_of_memory_at_width_80(module, args):
        if args[0].shape[-1] == 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    hook = base.unet.register_forward_pre_hook(out_of_memory_at_width_80)
    path = write(tmp_path, "p.txt", "ok --w 64 --h 64 --s 2\nbig --w 80 --h 64 --s 2\nnext --w 64 --h 64 --s 2\n")
    try:
        results = draw(tiny_lora, load_prompts(path).prompts, tmp_path / "out")
        assert base.unet.training
    finally:
        hook.remove()
        base.unet.eval()
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].path is None
    assert results[1].error == f"{path}:2: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert sorted(f.name for f in (tmp_path / "out" / "sample").iterdir()) == sorted(
        r.path.name for r in (results[0], results[2]))  # no temp or partial file left


def test_sample_folder_that_cannot_be_made_fails_every_prompt_in_one_line(tiny_lora, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where output_dir should be")
    results = draw(tiny_lora, [SamplePrompt(0, "a"), SamplePrompt(1, "b")], blocker)
    assert [r.ok for r in results] == [False, False]
    assert results[0].error.startswith(f"cannot create the sample folder {blocker / 'sample'}: ")
    assert blocker.read_text() == "a file where output_dir should be"
