#!/usr/bin/env python
"""How long ``--base_weights`` adds to a run's start on a full-size SD1.5 (run by hand, not a test).

    PYTHONPATH=. .venv/bin/python bench/bench_base_weights.py [--root DIR] [--dim 32] [--algo lora|loha]

The model is the one ``bench/bench_memory.py`` builds (full-size SD1.5, random weights, ``<root>/sd15-random``).
A LoRA of rank ``--dim`` over every module the engine's networks.lora targets (U-Net attention + text encoder),
or a LyCORIS LoHa of that rank, is made with random non-zero weights and saved; then the base is loaded and
the file merged with ``engine.base_weights.merge_base_weights``. Prints the file size, the modules merged,
the merge's wall time and the peak RSS before and after it.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_file(model: Path, dest: Path, dim: int, algo: str) -> Path:
    import torch
    from safetensors.torch import save_file

    from engine.models import load_base_model

    base = load_base_model(str(model))
    torch.manual_seed(1)
    if algo == "lora":
        from engine.lora import apply_lora

        net = apply_lora(base.unet, base.text_encoder, dim=dim, alpha=dim / 2)
        for m in net.modules:
            for p in m.up_params:
                p.data.normal_(0, 0.01)
        tensors = net.state_dict_kohya()
    else:
        from engine.lycoris_net import apply_lycoris

        net = apply_lycoris(base.unet, base.text_encoder, dim=dim, alpha=dim / 2, network_args=[f"algo={algo}"])
        for p in net.unet_params + net.text_encoder_params:
            p.data.normal_(0, 0.01)
        tensors = net.state_dict_kohya()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "spyke-bench")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--algo", default="lora", choices=("lora", "loha", "lokr", "locon"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)   # child: write the file, then exit
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_memory import build_full_model

    from engine.base_weights import merge_base_weights
    from engine.models import load_base_model

    model = build_full_model(args.root / "sd15-random")
    if args.make:
        make_file(model, args.make, args.dim, args.algo)
        return
    path = args.root / f"merge-{args.algo}-{args.dim}.safetensors"
    if not path.exists():   # in a child process, so this one's peak RSS is the merge's alone
        subprocess.run([sys.executable, __file__, "--root", str(args.root), "--dim", str(args.dim), "--algo",
                        args.algo, "--make", str(path)], check=True)
    base = load_base_model(str(model))
    with torch.no_grad():   # page every weight in, so "before" is the loaded model's own peak
        for module in (base.unet, base.text_encoder):
            for p in module.parameters():
                p.add_(0)
    before = rss_mb()
    t0 = time.perf_counter()
    lines = merge_base_weights([str(path)], [0.8], base.unet, base.text_encoder)
    took = time.perf_counter() - t0
    print(f"file {path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    for line in lines[1:-1]:
        print(line)
    print(f"merge: {took:.2f} s; peak RSS {before:.0f} MB before, {rss_mb():.0f} MB after")


if __name__ == "__main__":
    main()
