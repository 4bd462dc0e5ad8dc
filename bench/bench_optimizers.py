#!/usr/bin/env python
"""Step time of each kohya optimizer on the tiny model, relative to AdamW (run by hand, not a test).

    .venv/bin/python bench/bench_optimizers.py [--steps 16] [--warmup 4] [--repeats 3] [--step-only] [NAME ...]

Each run is ``engine.trainer.Trainer`` on the tiny SD1.5-shaped model and a 4-image 64 px dataset
(UNet + TE LoRA, dim 4, fp32, no saves). Step time is the median ``StepCompleted.step_seconds``
after the warm-up steps; repeats are interleaved (AdamW, A, B, ..., AdamW, A, B, ...) so machine load
spreads over all optimizers, and the best repeat counts. The ratio is against AdamW's best.

``--step-only`` times just ``optimizer.step()`` (process CPU time, so other load on the machine
matters less) over the tiny model's real LoRA parameters with fixed gradients: the part of a step
that differs between optimizers. It also prints AdamW's share of a full training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADAPTIVE = {"learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0}


def run_once(root: Path, dataset_toml: Path, name: str, steps: int, warmup: int) -> float:
    from engine.demo import prepare_demo
    from engine.events import StepCompleted
    from engine.trainer import Trainer

    extra = ADAPTIVE if name.startswith(("DAdapt", "Prodigy")) else {}
    out = Path(tempfile.mkdtemp(dir=root)) / "out"
    cfg = prepare_demo(root, out.parent, dataset_config=str(dataset_toml), resolution="64", max_train_steps=steps,
                       max_train_epochs=None, save_every_n_steps=None, save_every_n_epochs=None, save_state=False,
                       gradient_checkpointing=False, seed=1, output_dir=str(out), optimizer_type=name,
                       lr_scheduler="constant", **extra).validate()
    times: list[float] = []
    result = Trainer(cfg, sinks=[lambda e: times.append(e.step_seconds) if isinstance(e, StepCompleted) else None]).run()
    if result.status != "completed":
        raise SystemExit(f"{name}: {result.error}")
    return statistics.median(times[warmup:])


def step_only(root: Path, names: list[str], steps: int, warmup: int, repeats: int) -> dict[str, float]:
    import time

    import torch

    from engine.config import TrainConfig
    from engine.lora import apply_lora
    from engine.models import load_base_model
    from engine.optimizers import build_optimizer

    base = load_base_model(str(root / "tiny-sd15"))
    net = apply_lora(base.unet, base.text_encoder, dim=4, alpha=1.0, train_unet=True, train_text_encoder=True,
                     text_encoder_frozen=False)
    shapes = [p.shape for p in net.unet_params + net.text_encoder_params]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name in names:
            lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-4
            params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for s in shapes]
            built = build_optimizer(TrainConfig(optimizer_type=name, learning_rate=lr),
                                    [{"params": params, "lr": lr}], "cpu")
            for i in range(warmup + steps):
                if i == warmup:
                    started = time.process_time()
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                built.optimizer.step()
            seconds = (time.process_time() - started) / steps
            best[name] = min(best.get(name, seconds), seconds)
    return best


def main() -> None:
    from engine.optimizers import KNOWN_OPTIMIZERS
    from engine.tiny import build_tiny_model, generate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=[n for n in KNOWN_OPTIMIZERS if n != "DAdaptAdamPreprint"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-only", action="store_true", help="time optimizer.step() alone (CPU time)")
    args = parser.parse_args()
    names = ["AdamW"] + [n for n in args.names if n != "AdamW"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_model(root / "tiny-sd15")
        dataset = generate_dataset(root / "dataset", num_images=4, num_repeats=1, resolution=64)
        if args.step_only:
            best = step_only(root, names, args.steps, args.warmup, args.repeats)
            print(f"{'optimizer':<20} {'step() ms':>9} {'vs AdamW':>9}")
            for name in names:
                print(f"{name:<20} {best[name] * 1000:9.2f} {best[name] / best['AdamW']:9.2f}")
            return
        best = {}
        for _ in range(args.repeats):
            for name in names:
                seconds = run_once(root, dataset.dataset_toml, name, args.steps, args.warmup)
                best[name] = min(best.get(name, seconds), seconds)
                print(f"  {name}: {seconds * 1000:.1f} ms/step", file=sys.stderr, flush=True)
    print(f"{'optimizer':<20} {'ms/step':>8} {'vs AdamW':>9}")
    for name in names:
        print(f"{name:<20} {best[name] * 1000:8.1f} {best[name] / best['AdamW']:9.2f}")


if __name__ == "__main__":
    main()
