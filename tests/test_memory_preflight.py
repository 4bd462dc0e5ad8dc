"""The memory pre-flight: sizes from headers, the estimate against measurements, verdicts, refusal."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import ConfigError
from engine.fit import preflight
from engine.fit.device_memory import DeviceMemory, device_memory
from engine.fit.advice import savings
from engine.fit.estimate import Settings, estimate
from engine.fit.preflight import MemoryCheckError, enforce, memory_preflight
from engine.fit.shapes import ComponentSizes, ModelShapes, model_shapes
from engine.models import DEFAULT_SD15_CONFIG_DIR

GB = 1e9


def sd15_shapes() -> ModelShapes:
    """Full-size SD1.5: the counts the shapes module reads from a random-weight copy of the shipped configs."""
    cfg = {c: json.loads((DEFAULT_SD15_CONFIG_DIR / c / "config.json").read_text()) for c in
           ("unet", "vae", "text_encoder")}
    return ModelShapes(ComponentSizes(859_520_964, 423_936), ComponentSizes(123_060_480, 165_888),
                       ComponentSizes(83_653_863), cfg["unet"], cfg["vae"], cfg["text_encoder"])


def tiny_config(tiny_cache, tmp_path, **changes):
    from engine.demo import prepare_demo

    values = dict(device="cpu", max_train_epochs=None, max_train_steps=4, network_dim=32)
    return prepare_demo(root=tiny_cache, output_root=tmp_path, **{**values, **changes})


def fake_device(budget: float, kind: str = "mps") -> DeviceMemory:
    return DeviceMemory(kind, int(budget), int(16 * GB), "unified" if kind == "mps" else "available RAM")


def test_lora_parameter_count_from_the_headers_matches_the_injected_network(tiny_cache):
    from engine.lora import apply_lora
    from engine.models import load_base_model

    shapes = model_shapes(tiny_cache / "tiny-sd15", DEFAULT_SD15_CONFIG_DIR)
    base = load_base_model(tiny_cache / "tiny-sd15")
    net = apply_lora(base.unet, base.text_encoder, dim=4, alpha=1.0)
    assert 4 * shapes.unet.lora_per_rank == sum(p.numel() for p in net.unet_params)
    assert 4 * shapes.text_encoder.lora_per_rank == sum(p.numel() for p in net.text_encoder_params)
    frozen = sum(p.numel() for p in base.unet.parameters()) - sum(p.numel() for p in net.unet_params)
    assert shapes.unet.params == frozen


# Peak RSS measured by bench/bench_memory.py (2 AdamW steps, fp32, dim 32, clip_skip 2, on CPU).
@pytest.mark.parametrize("res,batch,gc,measured", [
    (128, 1, True, 5.085e9), (128, 1, False, 5.260e9), (256, 1, True, 5.333e9), (256, 1, False, 5.870e9),
    (128, 2, False, 5.547e9), (256, 2, True, 5.858e9), (384, 2, True, 7.293e9), (384, 2, False, 8.801e9),
    (512, 1, True, 7.038e9), (512, 1, False, 8.435e9),
])
def test_full_size_estimate_is_within_20_percent_of_the_measured_peak(res, batch, gc, measured):
    est = estimate(sd15_shapes(), Settings(res, res, batch, gc, network_dim=32, no_half_vae=True))
    assert abs(est.peak_bytes - measured) / measured <= 0.20


def test_tiny_estimate_is_within_20_percent_of_the_measured_peak(tiny_cache):
    shapes = model_shapes(tiny_cache / "tiny-sd15", DEFAULT_SD15_CONFIG_DIR)
    est = estimate(shapes, Settings(128, 128, 1, True, network_dim=32, no_half_vae=True))
    assert abs(est.peak_bytes - 502e6) / 502e6 <= 0.20


def test_activations_grow_with_batch_and_resolution_and_shrink_with_checkpointing():
    shapes = sd15_shapes()
    peak = lambda **kw: estimate(shapes, Settings(**{**dict(width=512, height=512, batch=1,  # noqa: E731
                                                            gradient_checkpointing=False), **kw})).peak_bytes
    assert peak(batch=2) > peak() > peak(width=256, height=256)
    assert peak(gradient_checkpointing=True) < peak()
    assert peak(mixed_precision="bf16") < peak()
    assert peak(optimizer="AdamW8bit") < peak() < peak(optimizer="Prodigy")


def test_a_float8_base_counts_one_byte_per_frozen_weight_of_the_parts_stored_in_float8():
    shapes = sd15_shapes()
    unet, te, vae = shapes.unet.params, shapes.text_encoder.params, shapes.vae.params
    weights = lambda **kw: estimate(shapes, Settings(512, 512, 1, True, mixed_precision="bf16",  # noqa: E731
                                                     **kw)).parts["weights"]
    assert weights() == (unet + te + vae) * 2
    assert weights(fp8_base=True) == unet + te + vae * 2
    assert weights(fp8_base_unet=True) == unet + te * 2 + vae * 2


def test_the_pre_flight_reads_the_float8_flags_from_the_config(tiny_cache, tmp_path):
    from engine.fit.preflight import settings_for

    config = tiny_config(tiny_cache, tmp_path, mixed_precision="bf16", fp8_base=True, fp8_base_unet=True)
    s = settings_for(config)
    assert (s.fp8_base, s.fp8_base_unet) == (True, True)


def test_savings_list_only_the_settings_that_lower_the_peak():
    without_gc = dict(savings(sd15_shapes(), Settings(512, 512, 4, False, network_dim=32)))
    assert set(without_gc) == {"--gradient_checkpointing", "--train_batch_size=2", "--resolution=384",
                               "--network_train_unet_only"}
    assert all(v > 0 for v in without_gc.values())
    with_gc = dict(savings(sd15_shapes(), Settings(512, 512, 4, True, network_dim=32)))
    assert "--gradient_checkpointing" not in with_gc and "--cache_latents" not in with_gc   # the UNet's peak rules
    wide_vae = sd15_shapes()
    wide_vae = ModelShapes(wide_vae.unet, wide_vae.text_encoder, wide_vae.vae, wide_vae.unet_config,
                           {**wide_vae.vae_config, "block_out_channels": [1024, 1024, 1024, 1024]},
                           wide_vae.text_encoder_config)
    assert "--cache_latents" in dict(savings(wide_vae, Settings(512, 512, 4, True, cached_images=20)))
    done = dict(savings(sd15_shapes(), Settings(256, 256, 1, True, cache_latents=True, train_text_encoder=False)))
    assert done == {}


def test_on_cuda_the_advice_offers_the_base_model_in_float8_after_mixed_precision():
    from engine.fit.advice import advise, families

    shapes = sd15_shapes()
    mixed = Settings(512, 512, 1, True, network_dim=32, device="cuda", mixed_precision="bf16")
    saved = dict(savings(shapes, mixed))
    want = estimate(shapes, mixed).peak_bytes - estimate(shapes, dataclasses.replace(mixed, fp8_base=True)).peak_bytes
    assert saved["--fp8_base"] == want > 0.5e9            # the U-Net and text encoder at 1 byte instead of 2
    full = Settings(512, 512, 1, True, network_dim=32, device="cuda")
    (precision,) = [f for f in families(full) if f.name == "mixed_precision"]
    assert [o.flag for o in precision.steps] == ["--mixed_precision=bf16", "--mixed_precision=bf16 --fp8_base"]
    bf16_peak = estimate(shapes, dataclasses.replace(full, mixed_precision="bf16")).peak_bytes
    target = estimate(shapes, dataclasses.replace(full, mixed_precision="bf16", fp8_base=True)).peak_bytes
    assert target < bf16_peak
    fits = advise(shapes, full, [precision], target).fits
    assert [c.flags for c in fits] == [("--mixed_precision=bf16 --fp8_base",)]
    assert "--fp8_base" not in dict(savings(shapes, dataclasses.replace(mixed, device="mps")))            # float8 cannot run there
    assert "--fp8_base" not in dict(savings(shapes, dataclasses.replace(mixed, network_module="lycoris.kohya")))
    assert "--fp8_base" not in dict(savings(shapes, dataclasses.replace(mixed, fp8_base_unet=True)))


def test_verdict_is_fits_below_85_percent_tight_to_100_and_too_big_above(tiny_cache, tmp_path):
    config = tiny_config(tiny_cache, tmp_path)
    peak = memory_preflight(config, device=fake_device(16 * GB)).estimate.peak_bytes
    fits = memory_preflight(config, device=fake_device(peak / 0.80))
    tight = memory_preflight(config, device=fake_device(peak / 0.90))
    too_big = memory_preflight(config, device=fake_device(peak / 1.10))
    assert (fits.verdict, tight.verdict, too_big.verdict) == ("fits", "tight", "too_big")
    assert fits.summary().endswith("GB unified · fits") and fits.summary().startswith("est. peak 0.")
    assert fits.warning() is None and fits.savings == []
    assert tight.warning().startswith("memory: est. peak") and "tight (90%); to lower it: " in tight.warning()


def test_a_run_that_does_not_fit_is_refused_in_one_line_with_the_settings_that_would_fit():
    s = Settings(512, 512, 4, False, network_dim=32)
    too_big = preflight.judge(estimate(sd15_shapes(), s), fake_device(8 * GB), sd15_shapes(), s)
    with pytest.raises(MemoryCheckError) as err:
        enforce(too_big, ignore_memory_check=False)
    message = str(err.value)
    assert message.startswith("memory: est. peak ") and " of 8.0 GB unified · does not fit; to fit in 8.0 GB " \
        "unified: " in message
    assert "\n" not in message and message.endswith("— or pass --ignore_memory_check to start anyway")
    named = too_big.advice.suggestions()
    assert named and all(c.peak <= 8 * GB for c in named)
    for change in named:                           # each with its estimated peak and saving, as estimated
        assert f"{' '.join(change.flags)} (est. peak {change.peak / GB:.1f} GB, −" in message
    enforce(too_big, ignore_memory_check=True)


def test_nothing_that_fits_is_refused_with_the_closest_combination():
    s = Settings(512, 512, 4, False, network_dim=32)
    too_big = preflight.judge(estimate(sd15_shapes(), s), fake_device(1 * GB), sd15_shapes(), s)
    closest = too_big.advice.closest
    assert too_big.advice.fits == () and closest.peak > 1 * GB and len(closest.flags) > 1
    assert "; no setting named here fits in 1.0 GB unified; the closest: --gradient_checkpointing " in \
        too_big.refusal()


def test_plan_run_refuses_unless_ignore_memory_check(tiny_cache, tmp_path, monkeypatch):
    from engine.plan import plan_run

    monkeypatch.setattr(preflight, "device_memory", lambda device: fake_device(100e6, "cpu"))
    config = tiny_config(tiny_cache, tmp_path)
    with pytest.raises(MemoryCheckError, match=r"^memory: est\. peak 0\.\d GB of 0\.1 GB available RAM"):
        plan_run(config)
    plan = plan_run(config.replace(ignore_memory_check=True))
    assert plan.memory.verdict == "too_big"


def test_plan_run_warns_when_the_run_is_tight(tiny_cache, tmp_path, monkeypatch):
    from engine.plan import plan_run

    config = tiny_config(tiny_cache, tmp_path)
    peak = memory_preflight(config, device=fake_device(16 * GB)).estimate.peak_bytes
    monkeypatch.setattr(preflight, "device_memory", lambda device: fake_device(peak / 0.9))
    plan = plan_run(config)
    assert plan.memory.verdict == "tight"
    assert any(w.startswith("memory: est. peak") and "tight (90%)" in w for w in plan.warnings)


def test_headless_start_up_prints_the_estimate_and_refuses_before_loading(tiny_cache, tmp_path, monkeypatch):
    from engine import headless

    config = tiny_config(tiny_cache, tmp_path)
    monkeypatch.setattr(preflight, "device_memory", lambda device: fake_device(16 * GB))
    assert headless.memory_startup_line(config).endswith("of 16.0 GB unified · fits")
    monkeypatch.setattr(preflight, "device_memory", lambda device: fake_device(100e6))

    def no_trainer(*a, **k):
        raise AssertionError("the trainer must not start")

    monkeypatch.setattr("engine.trainer.Trainer", no_trainer)
    with pytest.raises(MemoryCheckError):
        headless.run_headless(config, out=io.StringIO())


def test_cli_train_headless_refusal_is_one_error_line_with_exit_2(tiny_cache, tmp_path, monkeypatch, capsys):
    from cockpit.cli import main

    monkeypatch.setattr(preflight, "device_memory", lambda device: fake_device(100e6, "cpu"))
    config = tiny_config(tiny_cache, tmp_path)
    argv = ["train", "--headless", f"--pretrained_model_name_or_path={config.pretrained_model_name_or_path}",
            f"--dataset_config={config.dataset_config}", f"--output_dir={config.output_dir}", "--device=cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spyke-cockpit: error: memory: est. peak")


@pytest.mark.parametrize("content", [None, b"", b"\x05", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                                     b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_an_unreadable_model_gives_no_verdict_rather_than_an_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    if content is not None:
        path.write_bytes(content)
    config = SimpleNamespace(pretrained_model_name_or_path=str(path), sd_config_dir="", device="cpu")
    assert memory_preflight(config) is None


def test_device_memory_reads_unified_memory_capped_by_the_recommended_maximum(monkeypatch):
    from engine.fit import device_memory as dm

    fake_torch = SimpleNamespace(backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: True)),
                                 mps=SimpleNamespace(recommended_max_memory=lambda: 11 * 2**30),
                                 cuda=SimpleNamespace(is_available=lambda: False))
    monkeypatch.setattr(dm, "_torch_if_worth_it", lambda device, platform: fake_torch)
    monkeypatch.setattr(dm, "_psutil", lambda: SimpleNamespace(total=16 * 2**30, available=9 * 2**30))
    got = device_memory("auto", platform="darwin")
    assert (got.device, got.budget, got.total, got.label) == ("mps", 11 * 2**30, 16 * 2**30, "unified")
    del fake_torch.mps.recommended_max_memory        # older torch: the whole unified memory
    assert device_memory("mps", platform="darwin").budget == 16 * 2**30


def test_device_memory_reads_cuda_free_memory_and_cpu_available_ram(monkeypatch):
    from engine.fit import device_memory as dm

    fake_torch = SimpleNamespace(backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)),
                                 cuda=SimpleNamespace(is_available=lambda: True, mem_get_info=lambda: (7e9, 24e9)))
    monkeypatch.setattr(dm, "_torch_if_worth_it", lambda device, platform: fake_torch)
    monkeypatch.setattr(dm, "_psutil", lambda: SimpleNamespace(total=32e9, available=20e9))
    assert device_memory("auto").budget == 7e9 and device_memory("auto").device == "cuda"
    assert device_memory("cpu").budget == 20e9 and device_memory("cpu").label == "available RAM"
    monkeypatch.setattr(dm, "_torch_if_worth_it", lambda device, platform: None)
    assert device_memory("auto").device == "cpu"


def test_inside_a_run_the_budget_counts_what_the_run_itself_holds(monkeypatch):
    from engine.fit import device_memory as dm

    fake_torch = SimpleNamespace(backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)),
                                 cuda=SimpleNamespace(is_available=lambda: True, mem_get_info=lambda: (1e9, 24e9),
                                                      memory_reserved=lambda: 20e9))
    monkeypatch.setattr(dm, "_torch_if_worth_it", lambda device, platform: fake_torch)
    monkeypatch.setattr(dm, "_psutil", lambda: SimpleNamespace(total=32e9, available=3e9))
    monkeypatch.setattr(dm, "_own_rss", lambda: 12e9)
    assert device_memory("cuda").budget == 1e9
    got = device_memory("cuda", in_use=True)
    assert (got.budget, got.label) == (21e9, "usable on the GPU")
    assert device_memory("cpu").budget == 3e9
    assert (device_memory("cpu", in_use=True).budget, device_memory("cpu", in_use=True).label) == (15e9, "usable RAM")


def test_the_memory_estimator_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from engine.fit.preflight import memory_preflight; "
            "from engine.fit.estimate import estimate; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- the settings that fit a budget
def budget_of(monkeypatch, in_run: float, at_start: float = 16 * GB) -> None:
    """The device's budget: ``at_start`` for the pre-flight, ``in_run`` asked from inside a run."""
    monkeypatch.setattr(preflight, "device_memory", lambda device, in_use=False: DeviceMemory(
        "cpu", int(in_run if in_use else at_start), int(32 * GB), "usable RAM" if in_use else "available RAM"))


def with_flags(config, text: str):
    """``config`` with the flags a suggestion names, as the command line would set them."""
    from engine.config_io import coerce_value
    from engine.fit.advice import change_flags

    flags = change_flags(text)
    assert flags, text
    return config.replace(**{n: True if raw is None else coerce_value(n, raw, "--" + n) for n, raw in flags})


def planned_peak(config) -> int:
    """The pre-flight's estimate of ``config``, planned from scratch."""
    from engine.plan import plan_run

    return plan_run(config.replace(ignore_memory_check=True)).memory.estimate.peak_bytes


def test_out_of_memory_advice_names_the_single_changes_that_fit_the_budget_each_with_its_peak(
        tiny_cache, tmp_path, monkeypatch):
    from engine.fit.advice import size
    from engine.plan import plan_run
    from engine.train.oom import fit_advice

    config = tiny_config(tiny_cache, tmp_path, gradient_checkpointing=False)
    budget_of(monkeypatch, 16 * GB)
    candidates = ["--gradient_checkpointing", "--cache_latents", "--network_train_unet_only"]
    peaks = {flag: planned_peak(with_flags(config, flag)) for flag in candidates}
    assert peaks["--gradient_checkpointing"] < planned_peak(config)
    budget = peaks["--gradient_checkpointing"]            # just what checkpointing needs
    budget_of(monkeypatch, budget)
    line, fits = fit_advice(config, plan_run(config).dataset, "cpu")
    assert line == f"to fit in {size(budget)} usable RAM: {', '.join(fits)}"
    named = [text.split(" (", 1)[0] for text in fits]
    assert named == [flag for flag in candidates if peaks[flag] <= budget]     # and the others do not fit
    assert "--gradient_checkpointing" in named
    for text in fits:
        assert f"(est. peak {size(peaks[text.split(' (', 1)[0]])}, −" in text


def test_when_no_single_change_fits_the_smallest_combination_is_named_and_the_refusal_names_the_same(
        tiny_cache, tmp_path, monkeypatch):
    import itertools

    from engine.fit.advice import size
    from engine.plan import plan_run
    from engine.train.oom import fit_advice

    config = tiny_config(tiny_cache, tmp_path, gradient_checkpointing=False)
    budget_of(monkeypatch, 16 * GB)
    candidates = ["--gradient_checkpointing", "--cache_latents", "--network_train_unet_only"]
    singles = {flag: planned_peak(with_flags(config, flag)) for flag in candidates}
    pairs = {f"{a} {b}": planned_peak(with_flags(config, f"{a} {b}")) for a, b in itertools.combinations(candidates, 2)}
    budget = min(pairs.values())
    assert budget < min(singles.values())                  # no single change is enough
    budget_of(monkeypatch, budget)
    plan = plan_run(config.replace(ignore_memory_check=True))
    line, fits = fit_advice(config, plan.dataset, "cpu")
    (change,) = fits
    flags = change.split(" (", 1)[0]
    assert len(flags.split()) == 2 and pairs[flags] <= budget
    assert f"(est. peak {size(pairs[flags])}, −" in change and line == f"to fit in {size(budget)} usable RAM: {change}"
    refused = memory_preflight(config, plan.dataset, device=fake_device(budget, "cpu"))
    assert refused.verdict == "too_big" and f"; to fit in {size(budget)} available RAM: {change} — " in \
        refused.refusal()


def test_when_the_estimate_read_under_the_budget_the_out_of_memory_advice_aims_below_the_estimate(
        tiny_cache, tmp_path, monkeypatch):
    from engine.fit.advice import size
    from engine.plan import plan_run
    from engine.train.oom import fit_advice

    config = tiny_config(tiny_cache, tmp_path, gradient_checkpointing=False)
    budget_of(monkeypatch, 16 * GB)
    peak = planned_peak(config)
    line, fits = fit_advice(config, plan_run(config).dataset, "cpu")
    target = int(peak * preflight.WARN_RATIO)
    aim = f"{size(target)} (15 % under the estimate {size(peak)}, which read under 16.0 GB usable RAM)"
    assert fits and (line.startswith(f"to fit in {aim}: ") or line.startswith(f"no setting named here fits in {aim}"))
    fitting = line.startswith("to fit")
    assert all((planned_peak(with_flags(config, text)) <= target) == fitting for text in fits)


def test_a_batch_size_or_resolution_the_dataset_config_sets_is_never_offered_as_a_flag(tiny_cache, tmp_path):
    from engine.fit.preflight import families_for, settings_for
    from engine.plan import plan_run
    from engine.tiny import generate_dataset

    own = generate_dataset(tmp_path / "ds", num_images=2, num_repeats=1, batch_size=4)   # batch_size = 4 in it
    config = tiny_config(tiny_cache, tmp_path, dataset_config=str(own.dataset_toml), resolution="512")
    plan = plan_run(config.replace(ignore_memory_check=True))
    s = settings_for(config, plan.dataset)
    assert s.batch == 4
    flags = [o.flag for f in families_for(config, s, plan.dataset) for o in f.steps]
    assert not [f for f in flags if f.startswith(("--train_batch_size", "--resolution"))], flags

    folders = tiny_config(tiny_cache, tmp_path, dataset_config="", train_data_dir=str(own.image_dir.parent),
                          resolution="384", train_batch_size=4)
    plan = plan_run(folders.replace(ignore_memory_check=True))
    s = settings_for(folders, plan.dataset)
    steps = {o.flag: o for f in families_for(folders, s, plan.dataset) for o in f.steps}
    assert {"--train_batch_size=2", "--train_batch_size=1", "--resolution=256"} <= set(steps)
    for flag in ("--train_batch_size=1", "--resolution=256"):     # as the run would take it
        assert estimate(model_shapes(folders.pretrained_model_name_or_path, DEFAULT_SD15_CONFIG_DIR),
                        dataclasses.replace(s, **steps[flag].changes)).peak_bytes == \
            planned_peak(with_flags(folders, flag))
