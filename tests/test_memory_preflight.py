"""The memory pre-flight: sizes from headers, the estimate against measurements, verdicts, refusal."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import ConfigError
from engine.fit import preflight
from engine.fit.device_memory import DeviceMemory, device_memory
from engine.fit.estimate import Settings, estimate, savings
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


def test_savings_list_only_the_settings_that_lower_the_peak():
    without_gc = dict(savings(sd15_shapes(), Settings(512, 512, 4, False, network_dim=32)))
    assert set(without_gc) == {"--gradient_checkpointing", "--train_batch_size=1", "--resolution=384",
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


def test_a_run_that_does_not_fit_is_refused_in_one_line_with_the_settings_that_would_help():
    s = Settings(512, 512, 4, False, network_dim=32)
    too_big = preflight.judge(estimate(sd15_shapes(), s), fake_device(8 * GB), sd15_shapes(), s)
    with pytest.raises(MemoryCheckError) as err:
        enforce(too_big, ignore_memory_check=False)
    message = str(err.value)
    assert message.startswith("memory: est. peak ") and " of 8.0 GB unified · does not fit; to lower it: " in message
    assert "\n" not in message and message.endswith("— or pass --ignore_memory_check to start anyway")
    assert "--gradient_checkpointing (−" in message and "--train_batch_size=1 (−" in message
    enforce(too_big, ignore_memory_check=True)


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


def test_the_memory_estimator_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from engine.fit.preflight import memory_preflight; "
            "from engine.fit.estimate import estimate; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
