"""Which attention runs: the SDPA kernel PyTorch dispatches for the UNet's head sizes, measured on the
device, the processors diffusers put in the UNet, and the one start-up line (and event) that says so."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from engine.attention_probe import MATH, attention_report, probe_sdpa_kernel, unet_head_dims


@pytest.fixture(scope="module")
def unet(tiny_cache):
    from engine.models import load_base_model

    return load_base_model(tiny_cache / "tiny-sd15").unet


def test_probe_names_the_real_aten_flash_kernel_on_the_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        kernel = probe_sdpa_kernel("cpu", dtype, 40)
        assert kernel == "_scaled_dot_product_flash_attention_for_cpu"
        assert hasattr(torch.ops.aten, kernel)


def test_probe_measures_the_dispatch_so_a_forced_math_backend_is_reported():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        kernel = probe_sdpa_kernel("cpu", torch.float32, 40)
    assert kernel == MATH and hasattr(torch.ops.aten, kernel)


def test_probe_leaves_the_seeded_global_rng_untouched():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    probe_sdpa_kernel("cpu", torch.float32, 8, autocast_dtype=torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), before)


def test_report_of_the_unet_names_its_sdpa_processors_head_sizes_and_kernel(unet):
    heads = {m.to_q.out_features // m.heads for m in unet.modules() if type(m).__name__ == "Attention"}
    started = time.perf_counter()
    report = attention_report(unet, "cpu", torch.bfloat16)
    assert time.perf_counter() - started < 0.5
    assert report.processors == ("AttnProcessor2_0",) and report.sdpa and report.fused
    assert report.head_dims == unet_head_dims(unet) == tuple(sorted(heads))
    assert report.kernels == ("_scaled_dot_product_flash_attention_for_cpu",)
    dims = "/".join(map(str, report.head_dims))
    assert report.line() == ("attention: SDPA (AttnProcessor2_0), kernel _scaled_dot_product_flash_attention_for_cpu "
                             f"(cpu, bfloat16, head dims {dims})")


def test_a_unet_with_a_non_sdpa_processor_is_reported_as_such(tiny_cache):
    from diffusers.models.attention_processor import AttnProcessor

    from engine.models import load_base_model

    other = load_base_model(tiny_cache / "tiny-sd15").unet
    other.set_attn_processor(AttnProcessor())
    report = attention_report(other, "cpu", torch.float32)
    assert report.processors == ("AttnProcessor",) and not report.sdpa and report.kernels == ()
    assert report.line().startswith("attention: AttnProcessor (not PyTorch SDPA")


def test_attention_event_round_trips_through_the_events_file():
    from engine.attention_probe import AttentionReport
    from engine.events import AttentionKernel, event_from_dict

    report = AttentionReport(("AttnProcessor2_0",), ("_scaled_dot_product_efficient_attention",), (40, 80, 160),
                             "float32", "cuda")
    event = AttentionKernel.of(report)
    back = event_from_dict(json.loads(event.to_json()))
    assert back == event and back.kernels == ["_scaled_dot_product_efficient_attention"]
    assert back.message == ("attention: SDPA (AttnProcessor2_0), kernel _scaled_dot_product_efficient_attention "
                            "(cuda, float32, head dims 40/80/160)")


def test_a_math_fallback_is_named_as_such_in_the_line_but_mps_own_kernel_is_not():
    from engine.attention_probe import AttentionReport

    math = AttentionReport(("AttnProcessor2_0",), (MATH,), (40,), "float32", "cuda")
    assert not math.fused and math.line() == ("attention: SDPA (AttnProcessor2_0), kernel "
                                              f"{MATH} — the unfused math fallback (cuda, float32, head dim 40)")
    mps = AttentionReport(("AttnProcessor2_0",), ("_scaled_dot_product_attention_math_for_mps",), (40,), "float16",
                          "mps")
    assert mps.fused and "fallback" not in mps.line()


def test_attention_flags_info_lines_point_at_the_start_up_kernel_line():
    from engine.config_io import build_config

    for flag in ("xformers", "sdpa", "mem_eff_attn"):
        notes: list[str] = []
        build_config(overrides={flag: True}, notes=notes)
        assert len(notes) == 1 and notes[0].startswith(f"--{flag}: accepted; ")
        assert "'attention: SDPA …, kernel …' names the kernel" in notes[0]


def test_headless_start_up_prints_the_attention_line_and_the_run_logs_its_event(tiny_cache, tmp_path):
    from engine.config import TrainConfig
    from engine.events import AttentionKernel, event_from_dict
    from engine.headless import run_headless
    from engine.tiny import generate_dataset

    data = generate_dataset(tmp_path / "data", num_images=2, num_repeats=1, resolution=64, seed=1)
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_cache / "tiny-sd15"),
                      dataset_config=str(data.dataset_toml), resolution="64", max_train_steps=1,
                      output_dir=str(tmp_path / "out"), output_name="att", network_dim=2, learning_rate=1e-3,
                      seed=1, device="cpu", no_notify=True)
    out = io.StringIO()
    assert run_headless(cfg, out=out) == 0
    lines = out.getvalue().splitlines()
    attention = [line for line in lines if line.startswith("attention: ")]
    assert attention and attention[0].startswith(
        "attention: SDPA (AttnProcessor2_0), kernel _scaled_dot_product_flash_attention_for_cpu (cpu, float32, ")
    assert lines.index(attention[0]) < next(i for i, line in enumerate(lines) if line.startswith("step 1/"))
    (events_file,) = (tmp_path / "out" / ".spyke").glob("*/events.jsonl")
    events = [event_from_dict(json.loads(line)) for line in events_file.read_text().splitlines()]
    (event,) = [e for e in events if isinstance(e, AttentionKernel)]
    assert event.kernels == ["_scaled_dot_product_flash_attention_for_cpu"] and event.device == "cpu"
