#!/usr/bin/env python
"""Step time and file size of LyCORIS networks vs kohya's plain LoRA on the tiny model (run by hand, not a test).

    .venv/bin/python bench/bench_networks.py [--steps 16] [--warmup 4] [--repeats 3]

Each run is ``engine.trainer.Trainer`` on the tiny SD1.5-shaped model and a 4-image 64 px dataset
(UNet + text encoder, dim 4 / alpha 1, fp32, one fp16 file saved at the end). Step time is the median
``StepCompleted.step_seconds`` after the warm-up steps; repeats are interleaved (LoRA, LoCon, ..., LoRA, ...)
so machine load spreads over all networks, and the best repeat counts. The file is the final
checkpoint (``--save_precision=fp16``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NETWORKS = {
    "LoRA (networks.lora)": ("networks.lora", []),
    "LoCon": ("lycoris.kohya", ["algo=locon", "preset=full", "conv_dim=4", "conv_alpha=1"]),
    "LoHa": ("lycoris.kohya", ["algo=loha", "preset=full", "conv_dim=4", "conv_alpha=1"]),
    "LoKr": ("lycoris.kohya", ["algo=lokr", "preset=full", "conv_dim=4", "conv_alpha=1", "factor=8"]),
    "DoRA (locon, dora_wd)": ("lycoris.kohya", ["algo=locon", "preset=attn-mlp", "dora_wd=True"]),
}


def run_once(root: Path, dataset_toml: Path, module: str, args: list[str], steps: int, warmup: int):
    from engine.demo import prepare_demo
    from engine.events import StepCompleted
    from engine.trainer import Trainer

    out = Path(tempfile.mkdtemp(dir=root)) / "out"
    cfg = prepare_demo(root, out.parent, dataset_config=str(dataset_toml), resolution="64", max_train_steps=steps,
                       max_train_epochs=None, save_every_n_steps=None, save_every_n_epochs=None, save_state=False,
                       gradient_checkpointing=False, seed=1, output_dir=str(out), network_module=module,
                       network_args=args, network_dim=4, network_alpha=1, save_precision="fp16",
                       lr_scheduler="constant").validate()
    times: list[float] = []
    result = Trainer(cfg, sinks=[lambda e: times.append(e.step_seconds) if isinstance(e, StepCompleted) else None]).run()
    if result.status != "completed":
        raise SystemExit(f"{module} {args}: {result.error}")
    return statistics.median(times[warmup:]), Path(result.final_path).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    from engine.tiny import build_tiny_model, generate_dataset

    root = Path(tempfile.mkdtemp(prefix="spyke-bench-networks-"))
    build_tiny_model(root / "tiny-sd15")
    ds = generate_dataset(root / "data", num_images=4, num_repeats=1, resolution=64)
    best: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for _ in range(a.repeats):
        for name, (module, args) in NETWORKS.items():
            t, size = run_once(root, ds.dataset_toml, module, args, a.steps, a.warmup)
            best[name] = min(best.get(name, t), t)
            sizes[name] = size
    ref = best["LoRA (networks.lora)"]
    print(f"{'network':<24} {'step ms':>8} {'vs LoRA':>8} {'file KB':>8}")
    for name in NETWORKS:
        print(f"{name:<24} {best[name] * 1000:8.1f} {best[name] / ref:8.2f} {sizes[name] / 1024:8.1f}")


if __name__ == "__main__":
    main()
