#!/usr/bin/env python
"""The reference job on a full-size SD1.5: s/step, memory, time to first step, attention, host reads (run by
hand, not a test).

    PYTHONPATH=. .venv/bin/python bench/bench_realsize.py [--device cpu|cuda|mps] [--resolution 256,512]
        [--steps 2] [--warmup 1] [--threads N] [--model PATH] [--root DIR] [--out FILE.json]

The model is the one ``bench/bench_memory.py`` builds: a full-size SD1.5 with random weights from the shipped
config folder ``engine/assets/sd15``, saved once to ``<root>/sd15-random`` (``--model`` takes a real one).
Each resolution runs ``engine.trainer.Trainer`` in a fresh subprocess with the reference job's flags (LoRA
dim 32 / alpha 16, AdamW, cosine, lr 1e-4 / UNet 1e-4 / TE 5e-5, fp32, no_half_vae, clip_skip 2, gradient
checkpointing, seed 42), batch 1, ``warmup + steps`` steps, and reports:

* s/step: the engine's ``step_seconds`` of the steps after warm-up (and the wall time between their events);
* time to first step: from ``Trainer.run()`` to the first step event, and from the model's load to it;
* memory: peak RSS (``ru_maxrss``) against the engine's estimate (``engine.fit``); on CUDA also
  ``torch.cuda.max_memory_allocated/reserved``, on MPS ``torch.mps.driver_allocated_memory`` (each only
  where that API exists);
* attention: the engine's ``attention: ...`` log line, the number of ``scaled_dot_product_attention`` calls
  per step, and the aten kernel torch picks for the UNet's largest attention call (replayed under the
  profiler with the same shapes, dtype, device and grad);
* host reads: every ``float(t)`` / ``.item()`` / ``bool(t)`` / ``int(t)`` / ``.tolist()`` of a tensor on the
  training device made by the main thread during a step (on MPS/CUDA each one waits for the device), with
  where it was made and the time it took; on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` counts every
  synchronising call as well.
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
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# The reference job's flags (the user's kohya command), saves off: only the steps are measured.
REFERENCE = dict(network_dim=32, network_alpha=16.0, optimizer_type="AdamW", learning_rate=1e-4, unet_lr=1e-4,
                 text_encoder_lr=5e-5, lr_scheduler="cosine", lr_warmup_steps=0, mixed_precision="no",
                 save_precision="float", no_half_vae=True, clip_skip=2, prior_loss_weight=1.0,
                 max_data_loader_n_workers=1, persistent_data_loader_workers=True, gradient_checkpointing=True,
                 seed=42, train_batch_size=1, cache_latents=False, max_train_epochs=None, save_every_n_steps=None,
                 save_every_n_epochs=None, save_state=False, output_name="bench")
READS = ("item", "tolist", "__float__", "__bool__", "__int__")


class HostReads:
    """Counts the main thread's reads of tensors on ``device`` (where they come from, how long they take)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device, self.main = torch, device, threading.get_ident()
        self.count, self.seconds, self.sites, self.site_seconds = 0, 0.0, Counter(), Counter()
        self.originals = {name: getattr(torch.Tensor, name) for name in READS}

    def install(self) -> None:
        for name, original in self.originals.items():
            setattr(self.torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        reads = self

        def read(tensor, *args, **kwargs):
            if threading.get_ident() != reads.main or tensor.device.type != reads.device:
                return original(tensor, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                reads.seconds += took
                reads.count += 1
                frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                              if str(REPO) in f.filename and "bench" not in f.filename), None)
                where = f"{Path(frame.filename).relative_to(REPO)}:{frame.lineno}" if frame else "library"
                reads.sites[f"{name} at {where}"] += 1
                reads.site_seconds[f"{name} at {where}"] += took
        return read

    def take(self) -> tuple[int, float, dict]:
        out = (self.count, self.seconds, {k: (n, self.site_seconds[k]) for k, n in self.sites.items()})
        self.count, self.seconds, self.sites, self.site_seconds = 0, 0.0, Counter(), Counter()
        return out


class SdpaCalls:
    """Counts torch.nn.functional.scaled_dot_product_attention calls and keeps the largest call's inputs."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self.F, self.original, self.count, self.largest = F, F.scaled_dot_product_attention, 0, None
        calls = self

        def sdpa(q, k, v, *args, **kwargs):
            calls.count += 1
            size = q.shape[-2] * k.shape[-2]
            if calls.largest is None or size > calls.largest[0]:
                calls.largest = (size, [(tuple(t.shape), t.dtype, t.requires_grad) for t in (q, k, v)], kwargs)
            return calls.original(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa

    def kernel(self, device: str) -> str:
        """The aten kernels that run for the largest call's shapes (forward and backward), under the profiler."""
        import torch

        if self.largest is None:
            return "no call"
        _, specs, kwargs = self.largest
        tensors = [torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for shape, dtype, _ in specs]
        with torch.profiler.profile() as prof:
            out = self.original(*tensors, **{k: v for k, v in kwargs.items() if k != "attn_mask"})
            out.sum().backward()
        names = sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::_")})
        return ", ".join(names) or "no aten attention kernel seen"


def device_memory(device: str) -> dict:
    """The device allocator's figures, each only where torch has that API on this machine."""
    import torch

    out = {}
    if device == "cuda" and torch.cuda.is_available():
        for name in ("max_memory_allocated", "max_memory_reserved"):
            fn = getattr(torch.cuda, name, None)
            if callable(fn):
                out[name] = int(fn())
    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        for name in ("driver_allocated_memory", "current_allocated_memory", "recommended_max_memory"):
            fn = getattr(torch.mps, name, None)
            if callable(fn):
                out[name] = int(fn())
    return out


def make_config(model: Path, dataset: Path, out: Path, device: str, res: int, steps: int):
    from engine.config_io import build_config

    values = dict(REFERENCE, pretrained_model_name_or_path=str(model), dataset_config=str(dataset),
                  output_dir=str(out), resolution=str(res), max_train_steps=steps, device=device)
    return build_config(None, values).validate()


def child(spec: dict) -> None:
    import torch

    from engine.events import LogMessage, PhaseChanged, StepCompleted
    from engine.fit.preflight import estimate_memory
    from engine.trainer import Trainer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cfg = make_config(Path(spec["model"]), Path(spec["dataset"]), Path(spec["out"]), device, spec["res"],
                      spec["warmup"] + spec["steps"])
    estimate = estimate_memory(cfg, device_type=device)
    reads, sdpa = HostReads(device), SdpaCalls()
    syncs = Counter()
    if device == "cuda" and hasattr(torch.cuda, "set_sync_debug_mode"):
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def show(message, category, filename, lineno, *args, **kwargs):
            if "synchroniz" in str(message).lower():
                syncs["now"] += 1
            else:
                previous(message, category, filename, lineno, *args, **kwargs)
        warnings.showwarning = show
    steps, logs, marks = [], [], {}
    t0 = time.perf_counter()

    def sink(event) -> None:
        now = time.perf_counter() - t0
        if isinstance(event, PhaseChanged) and event.phase not in marks:
            marks[event.phase] = now
            if event.phase == "training":
                reads.install()
                reads.take()
                sdpa.count = 0
                syncs["now"] = 0
        elif isinstance(event, LogMessage):
            logs.append(event.message)
        elif isinstance(event, StepCompleted):
            n, seconds, sites = reads.take()
            steps.append(dict(step=event.step, step_seconds=event.step_seconds, at=now, loss=event.loss,
                              host_reads=n, read_seconds=seconds, read_sites=sites, sdpa_calls=sdpa.count,
                              syncs=syncs["now"]))
            sdpa.count, syncs["now"] = 0, 0

    result = Trainer(cfg, sinks=[sink]).run()
    for name, original in reads.originals.items():
        setattr(torch.Tensor, name, original)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    print(json.dumps({
        "status": result.status, "error": str(result.error or ""), "steps": steps, "marks": marks,
        "attention_log": [m for m in logs if m.startswith("attention:")], "sdpa_kernel": sdpa.kernel(device),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        "estimate": estimate.peak_bytes, "estimate_parts": estimate.parts, "device_memory": device_memory(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)


def summarise(res: int, got: dict, warmup: int) -> dict:
    timed = [s for s in got["steps"] if s["step"] > warmup]
    first = got["steps"][0]["at"] if got["steps"] else None
    walls = [b["at"] - a["at"] for a, b in zip(got["steps"], got["steps"][1:]) if b["step"] > warmup]
    # what the estimate is of: the process on the CPU, the device allocator's reservation (plus the CUDA
    # context the estimate counts) on CUDA, what the MPS driver holds on a Mac
    dm = got["device_memory"]
    measured_name, measured = "peak RSS", got["peak_rss"]
    if "max_memory_reserved" in dm:
        from engine.fit.estimate import CUDA_CONTEXT_BYTES

        measured_name, measured = "max_memory_reserved + CUDA context", dm["max_memory_reserved"] + CUDA_CONTEXT_BYTES
    elif "driver_allocated_memory" in dm:
        measured_name, measured = "driver_allocated_memory (end of run)", dm["driver_allocated_memory"]
    sites, site_seconds = Counter(), Counter()
    for s in timed:
        for k, (n, sec) in s["read_sites"].items():
            sites[k] += n
            site_seconds[k] += sec
    return {
        "resolution": res, "status": got["status"], "error": got["error"],
        "s_per_step": statistics.mean(s["step_seconds"] for s in timed) if timed else None,
        "s_per_step_wall": statistics.mean(walls) if walls else None,
        "step_seconds": [round(s["step_seconds"], 2) for s in got["steps"]],   # warm-up included
        "first_step_s": first, "load_to_first_step_s": first - got["marks"]["loading"] if first else None,
        "phases_s": {k: round(v, 1) for k, v in got["marks"].items()},   # seconds from run() to each phase
        "peak_rss": got["peak_rss"], "estimate": got["estimate"], "estimate_vs": measured_name,
        "estimate_error": (got["estimate"] - measured) / measured if measured else None,
        "device_memory": got["device_memory"], "attention_log": got["attention_log"],
        "sdpa_kernel": got["sdpa_kernel"], "sdpa_calls_per_step": [s["sdpa_calls"] for s in timed],
        "host_reads_per_step": [s["host_reads"] for s in timed],
        "host_read_us_per_step": [round(s["read_seconds"] * 1e6, 1) for s in timed],
        "read_sites": {k: f"{v / max(1, len(timed)):g} per step, {site_seconds[k] / v * 1e6:.1f} us each"
                       for k, v in sites.items()},
        "syncs_per_step": [s["syncs"] for s in timed], "threads": got["threads"], "torch": got["torch"],
        "losses": [s["loss"] for s in got["steps"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    ap.add_argument("--resolution", default="256,512")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--model", default=None, help="a base model (default: the random full-size SD1.5)")
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", default=None, help="append the results to this JSON file")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from bench_memory import build_full_model, dataset_for

    root = Path(args.root) if args.root else Path(tempfile.gettempdir()) / "spyke-bench-memory"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = Path(args.model).expanduser() if args.model else build_full_model(root / "sd15-random")
    print(f"model {model} ready in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    for res in (int(r) for r in args.resolution.split(",")):
        spec = dict(model=str(model), dataset=str(dataset_for(root, res, 1)), device=args.device, res=res,
                    out=str(root / "runs" / f"realsize-{args.device}-{res}-{time.time_ns()}"),
                    steps=args.steps, warmup=args.warmup, threads=args.threads)
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            row = {"resolution": res, "status": "crashed", "error": (proc.stderr or proc.stdout).strip()[-2000:]}
        else:
            row = summarise(res, json.loads(lines[-1]), args.warmup)
        row.update(device=args.device, load_before=load, load_after=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
