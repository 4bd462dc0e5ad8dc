"""Seconds per sample image and the memory sampling adds (a note, not a test).

    .venv/bin/python bench/bench_samples.py [--model tiny|sd15|both] [--images 2] [--threads N]

* tiny: the tiny SD1.5-shaped model (engine.tiny), 128 px, 20 steps euler_a, LoRA dim 32;
* sd15: full-size SD1.5 UNet, VAE and CLIP text encoder with random weights, built from
  engine/assets/sd15 with diffusers/transformers ``from_config``; 256 px, 20 steps euler_a,
  LoRA dim 32, fp32 on the CPU.

Each model runs in its own subprocess. The first image is a warm-up; the figures are the
per-image ``SampleResult.seconds`` of the others and the wall time of the whole
``generate_samples`` call. Memory: process RSS just before sampling, the peak while sampling
(polled every 5 ms), and what is still held afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SD15 = REPO / "engine" / "assets" / "sd15"


def _load(model: str, cache: Path):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engine.models import load_base_model

    if model == "tiny":
        from engine.tiny import build_tiny_model

        base = load_base_model(build_tiny_model(cache / "tiny-sd15"))
        return base.unet, base.text_encoder, base.vae, base.tokenizer
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15 / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15 / "vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15 / "text_encoder"))
    tok = CLIPTokenizer.from_pretrained(SD15 / "tokenizer")
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return unet, te, vae, tok


def child(model: str, images: int, threads: int | None) -> dict:
    import psutil
    import torch

    from engine.lora import apply_lora
    from engine.sample.generate import generate_samples
    from engine.sample.prompts import SamplePrompt

    if threads:
        torch.set_num_threads(threads)
    size = 128 if model == "tiny" else 256
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        unet, te, vae, tok = _load(model, Path(tmp))
        apply_lora(unet, te, dim=32, alpha=16)
        unet.train()
        te.train()
        load_s = time.perf_counter() - t0
        prompts = [SamplePrompt(i, "spyke, portrait, red jacket", "lowres", size, size, 1000 + i, 7.5, 20)
                   for i in range(images + 1)]
        proc = psutil.Process()
        before = proc.memory_info().rss
        peak = [before]
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t1 = time.perf_counter()
        results = generate_samples(unet, te, vae, tok, prompts, output_dir=tmp, output_name="bench", step=0,
                                   device="cpu", dtype=torch.float32, clip_skip=2, sampler="euler_a")
        wall = time.perf_counter() - t1
        done.set()
        poller.join()
        after = proc.memory_info().rss
    errors = [r.error for r in results if not r.ok]
    return {
        "model": model, "px": size, "steps": 20, "sampler": "euler_a", "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1), "warmup_s": round(results[0].seconds, 2),
        "per_image_s": [round(r.seconds, 2) for r in results[1:]], "call_wall_s": round(wall, 1),
        "rss_before_mb": before >> 20, "rss_peak_added_mb": (peak[0] - before) >> 20,
        "rss_after_added_mb": (after - before) >> 20, "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "sd15", "both"), default="both")
    ap.add_argument("--images", type=int, default=2, help="timed images after the warm-up one")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.images, args.threads)))
        return
    for model in ("tiny", "sd15") if args.model == "both" else (args.model,):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--images", str(args.images)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model}: failed\n{out.stderr[-2000:]}")
            continue
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
