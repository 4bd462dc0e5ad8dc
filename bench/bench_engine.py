#!/usr/bin/env python
"""Engine overhead and memory on the tiny SD1.5-shaped model (run by hand, not a test).

    .venv/bin/python bench/bench_engine.py [--steps 60] [--warmup 8] [--repeats 2] [--root DIR] [--profile]

Measures, each in a fresh subprocess so peak RSS is the job's own:

* **engine**: ``engine.trainer.Trainer`` on the seed's flags scaled down (128 px, batch 1,
  fp32, gradient checkpointing, clip_skip 2, dim 32 / alpha 16, cosine, AdamW, TE + UNet
  LoRA), no intermediate saves. Steps/s is wall time between step events after warm-up,
  so it includes everything the loop does between steps (events, control, memory samples).
* **hand**: a minimal loop doing the same work on the same batches: same base model,
  same peft LoRA injection, same gradient checkpointing; VAE encode, noise, CLIP
  (penultimate layer + final norm), UNet, MSE, backward, clip-grad, AdamW, cosine step.
  Batches are decoded before timing, so the hand loop has no data-loading cost at all.

The ratio engine s/step ÷ hand s/step is the engine's overhead (goal ≤ 1.05). For scale,
kohya sd-scripts on the same job on this machine: ~150 ms/step, ~470 MB peak RSS.
``--profile`` writes a cProfile of one more engine run to <root>/engine.prof (read it with pstats).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KOHYA_MS_PER_STEP = 150.0
KOHYA_PEAK_RSS_MB = 470.0
FLAGS = dict(resolution="128", train_batch_size=1, mixed_precision="no", save_precision="float",
             gradient_checkpointing=True, clip_skip=2, network_dim=32, network_alpha=16.0, learning_rate=1e-4,
             unet_lr=1e-4, text_encoder_lr=5e-5, lr_scheduler="cosine", lr_warmup_steps=0, seed=42,
             max_train_epochs=None, save_every_n_steps=None, save_every_n_epochs=None, save_state=False,
             cache_latents=False, no_half_vae=True, output_name="bench", device="cpu")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kB


def config(root: Path, steps: int):
    from engine.demo import prepare_demo

    return prepare_demo(root=root, output_root=root / "runs", max_train_steps=steps, **FLAGS).validate()


# ------------------------------------------------------------------------------ children
def child_engine(root: Path, steps: int, warmup: int, profile: bool) -> dict:
    from engine.events import StepCompleted
    from engine.trainer import Trainer

    cfg = config(root, steps)
    stamps: list[float] = []

    def sink(event) -> None:
        if isinstance(event, StepCompleted):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = Trainer(cfg, sinks=[sink])
    if profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(trainer.run)
        prof.dump_stats(str(root / "engine.prof"))
    else:
        result = trainer.run()
    total = time.perf_counter() - t0
    assert result.status == "completed", result.error
    timed = stamps[warmup:]
    return {"s_per_step": (timed[-1] - timed[0]) / (len(timed) - 1), "steps": len(stamps), "total_s": total,
            "peak_rss_mb": peak_rss_mb(), "last_loss": result.losses[-1]}


def child_hand(root: Path, steps: int, warmup: int) -> dict:
    """The minimal loop: same models, peft LoRA, same data, same math; nothing else."""
    import random

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from engine.lora import apply_lora
    from engine.models import load_base_model
    from engine.plan import plan_run

    cfg = config(root, steps)
    plan = plan_run(cfg)
    torch.manual_seed(cfg.seed)
    base = load_base_model(cfg.pretrained_model_name_or_path)
    unet, vae, te, tok = base.unet, base.vae, base.text_encoder, base.tokenizer
    net = apply_lora(unet, te, dim=cfg.network_dim, alpha=cfg.network_alpha)
    vae.requires_grad_(False).eval()
    unet.enable_gradient_checkpointing()
    te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) \
        if hasattr(te, "activation_checkpointing_enable") else \
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unet.train()
    te.train()
    params = net.unet_params + net.text_encoder_params
    opt = torch.optim.AdamW([{"params": net.unet_params, "lr": 1e-4}, {"params": net.text_encoder_params, "lr": 5e-5}])
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=steps)
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, clip_sample=False)
    # decode every batch up front: the loop below does no data work at all
    rng = random.Random(cfg.seed)
    batches = []
    epoch = 0
    while len(batches) < steps:
        for ids in plan.dataset.epoch_batches(epoch, cfg.seed):
            b = plan.dataset.load_batch(ids, rng)
            input_ids = tok(b.captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                            return_tensors="pt").input_ids
            batches.append((b.pixel_values, input_ids))
        epoch += 1
    gen = torch.Generator().manual_seed(cfg.seed)
    text_model = getattr(te, "text_model", te)
    stamps = []
    t0 = time.perf_counter()
    for pixels, input_ids in batches[:steps]:
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * 0.18215
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text_model.final_layer_norm(te(input_ids, output_hidden_states=True).hidden_states[-2])
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=[1, 2, 3]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last = float(loss.detach())
        stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    timed = stamps[warmup:]
    return {"s_per_step": (timed[-1] - timed[0]) / (len(timed) - 1), "steps": len(stamps), "total_s": total,
            "peak_rss_mb": peak_rss_mb(), "last_loss": last}


# ------------------------------------------------------------------------------ parent
def spawn(kind: str, root: Path, steps: int, warmup: int, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--steps", str(steps),
           "--warmup", str(warmup)] + (["--profile"] if profile else []) + \
        ([f"--threads={os.environ['OMP_NUM_THREADS']}"] if os.environ.get("OMP_NUM_THREADS") else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in both jobs (default: torch's; use 1 on a loaded machine)")
    ap.add_argument("--child", choices=("engine", "hand"))
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # inherited by the children
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from engine.trainer import quiet_libraries

        quiet_libraries()
        fn = child_engine if args.child == "engine" else child_hand
        res = fn(args.root, args.steps, args.warmup, args.profile) if args.child == "engine" else \
            fn(args.root, args.steps, args.warmup)
        print(json.dumps(res))
        return

    root = args.root or Path(tempfile.mkdtemp(prefix="spyke-bench-"))
    config(root, args.steps)      # build the tiny model and dataset once, outside the timings
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {"engine": [], "hand": []}
    for _ in range(args.repeats):             # interleaved, so background load hits both alike
        for kind in ("hand", "engine"):
            runs[kind].append(spawn(kind, root, args.steps, args.warmup))
            r = runs[kind][-1]
            print(f"  {kind:6s} {r['s_per_step'] * 1000:7.1f} ms/step  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"({r['steps']} steps, {r['total_s']:.1f} s)", flush=True)
    if args.profile:
        spawn("engine", root, args.steps, args.warmup, profile=True)
        print(f"  profile: {root / 'engine.prof'}")
    eng = min(r["s_per_step"] for r in runs["engine"])
    hand = min(r["s_per_step"] for r in runs["hand"])
    eng_rss = statistics.median(r["peak_rss_mb"] for r in runs["engine"])
    hand_rss = statistics.median(r["peak_rss_mb"] for r in runs["hand"])
    after = os.getloadavg()
    print(f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: {after[0]:.2f} on "
          f"{os.cpu_count()} CPUs; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"engine: {eng * 1000:.1f} ms/step ({1 / eng:.2f} steps/s), peak RSS {eng_rss:.0f} MB")
    print(f"hand loop: {hand * 1000:.1f} ms/step ({1 / hand:.2f} steps/s), peak RSS {hand_rss:.0f} MB")
    print(f"overhead: engine / hand = {eng / hand:.3f}x (goal <= 1.05)")
    print(f"vs kohya (~{KOHYA_MS_PER_STEP:.0f} ms/step, ~{KOHYA_PEAK_RSS_MB:.0f} MB): "
          f"{KOHYA_MS_PER_STEP / (eng * 1000):.2f}x faster, {eng_rss / KOHYA_PEAK_RSS_MB:.2f}x the RSS")


if __name__ == "__main__":
    main()
