"""Draw sample images with the model being trained, as kohya's ``sample_images`` does.

A diffusers ``StableDiffusionPipeline`` is built around the given modules (the peft-wrapped
UNet and text encoder, LoRA applied as it is; no safety checker), with the models in eval
mode under ``torch.no_grad``. Per prompt, as kohya: a fresh scheduler for its sampler, the
prompt's size, steps and CFG scale, an empty negative prompt when none is given, and the
text encoded with ``clip_skip`` as in training (the n-th last hidden state, then the final
layer norm), a prompt longer than 75 tokens in up to three chunks as kohya's long-prompt
pipeline does (``engine.text_encoding``). Noise comes from a CPU ``torch.Generator`` seeded with the prompt's seed, so
the same seed gives the same PNG bytes and the global RNGs are never drawn from.

A prompt without ``--d`` uses ``default_seed + index`` (so every checkpoint's image set is
drawn from the same noise), or a fresh random seed when ``default_seed`` is None; as in
kohya, only a prompt's own seed goes into the file name.

Afterwards the RNG states, the modules' train/eval modes and devices are as before, the
pipeline is freed and the device's cache emptied. A prompt that fails (out of memory, a
shape the model cannot take, a full disk) becomes a failed ``SampleResult`` with a
one-line reason and the next prompt is drawn.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.devices import empty_cache
from engine.errors import SpykeError
from engine.sample.guard import preserved
from engine.sample.naming import sample_dir, sample_filename
from engine.sample.png import encode_png, sample_parameters, write_atomic
from engine.sample.prompts import SamplePrompt
from engine.sample.samplers import DEFAULT_SAMPLER, build_scheduler, check_sampler, check_steps
from engine.text_encoding import encode_sample_prompts

_SEED_MODULUS = 2**64


@dataclass(frozen=True)
class SampleResult:
    prompt: SamplePrompt
    seed: int  # the seed the image was drawn with (the prompt's, or the default one)
    sampler: str
    path: Path | None = None  # the PNG, when it was written
    error: str | None = None  # one line, when it failed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def seed_for(prompt: SamplePrompt, default_seed: int | None) -> int:
    """The prompt's ``--d`` seed, else ``default_seed + index``, else a fresh random one."""
    if prompt.seed is not None:
        return prompt.seed
    if default_seed is not None:
        return (default_seed + prompt.index) % _SEED_MODULUS
    return secrets.randbits(63)


def generate_samples(
    unet,
    text_encoder,
    vae,
    tokenizer,
    prompts: Iterable[SamplePrompt],
    *,
    output_dir: str | Path,
    output_name: str | None,
    step: int,
    epoch: int | None = None,
    device,
    dtype,
    clip_skip: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    default_seed: int | None = None,
    v_parameterization: bool = False,
    on_result: Callable[[SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Draw and save one PNG per prompt under ``<output_dir>/sample``; one result per prompt, in order.

    ``step``/``epoch`` name the files as kohya does (``epoch`` set: sampled at that epoch's end).
    ``dtype``: the compute dtype (float16/bfloat16 run under autocast, as kohya's accelerator does).
    ``on_result`` is called after each image, e.g. to report progress.
    """
    import torch

    check_sampler(sampler)
    prompts = list(prompts)
    device = torch.device(device)
    modules = [m for m in (unet, text_encoder, vae) if m is not None]
    results: list[SampleResult] = []
    with preserved(modules), torch.no_grad():
        places = [(m, _device_of(m)) for m in modules]
        pipe = None
        try:
            for m in modules:
                m.eval()
                m.to(device)
            folder = sample_dir(output_dir)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = f"cannot create the sample folder {folder}: {exc.strerror or exc}; check output_dir"
                return _all_failed(prompts, default_seed, sampler, reason, on_result)
            pipe = _pipeline(unet, text_encoder, vae, tokenizer, sampler, v_parameterization)
            for prompt in prompts:
                result = _draw(pipe, prompt, folder, output_name=output_name, step=step, epoch=epoch,
                               device=device, dtype=dtype, clip_skip=clip_skip, sampler=sampler,
                               default_seed=default_seed, v_parameterization=v_parameterization)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            del pipe
            for m, place in places:
                if place is not None:
                    m.to(place)
            gc.collect()
            empty_cache(device.type)
    return results


def _all_failed(prompts, default_seed, sampler, reason, on_result) -> list[SampleResult]:
    out = []
    for p in prompts:
        result = SampleResult(p, seed_for(p, default_seed), p.sampler or sampler, error=reason)
        out.append(result)
        if on_result is not None:
            on_result(result)
    return out


def _device_of(module):
    for tensor in module.parameters():
        return tensor.device
    return None


def _pipeline(unet, text_encoder, vae, tokenizer, sampler: str, v_parameterization: bool):
    import warnings

    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=build_scheduler(sampler, v_parameterization=v_parameterization),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe, prompt: SamplePrompt, folder: Path, *, output_name, step, epoch, device, dtype, clip_skip,
          sampler, default_seed, v_parameterization) -> SampleResult:
    import torch

    seed = seed_for(prompt, default_seed)
    name = prompt.sampler or sampler
    started = time.perf_counter()
    try:
        check_steps(name, prompt.steps)
        # A fresh scheduler per prompt, set after the pipeline is built (as kohya does).
        pipe.scheduler = build_scheduler(name, v_parameterization=v_parameterization)
        cfg = prompt.scale > 1.0
        texts = [prompt.prompt] + ([prompt.negative_prompt or ""] if cfg else [])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with _autocast(device, dtype):      # the prompts too, as kohya's pipeline (and --fp8_base weights) need
            cond, uncond = (encode_sample_prompts(pipe.text_encoder, pipe.tokenizer, texts, device, clip_skip)
                            + [None])[:2]
            image = pipe(
                prompt_embeds=cond.to(dtype), negative_prompt_embeds=uncond.to(dtype) if cfg else None,
                height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps,
                guidance_scale=prompt.scale, generator=generator, output_type="pil",
            ).images[0]
        params = sample_parameters(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt, seed=seed,
                                   steps=prompt.steps, scale=prompt.scale, sampler=name,
                                   width=prompt.width, height=prompt.height)
        data = encode_png(image, params)
        path = folder / sample_filename(output_name, prompt.index, step=step, epoch=epoch, seed=prompt.seed)
        write_atomic(path, data)
    except Exception as exc:  # noqa: BLE001 - one failed image must never stop the others or the run
        empty_cache(torch.device(device).type)
        where = prompt.where or f"prompt {prompt.index}"
        return SampleResult(prompt, seed, name, error=f"{where}: {_one_line(exc)}",
                            seconds=time.perf_counter() - started)
    return SampleResult(prompt, seed, name, path=path, seconds=time.perf_counter() - started)


def _autocast(device, dtype) -> Any:
    import torch

    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SpykeError):
        return str(exc)
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 200:
        first = first[:200].rstrip() + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
