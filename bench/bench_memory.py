#!/usr/bin/env python
"""Peak RSS of real training steps on this CPU, for fitting the memory estimator (run by hand, not a test).

    PYTHONPATH=. .venv/bin/python bench/bench_memory.py [--root DIR] [--only tiny|full] [--steps 2]
        [--res 128,256,384] [--batch 1,2] [--out bench/memory_measurements.json]

For the tiny SD1.5-shaped model and for a full-size SD1.5 (random weights built from the shipped
config folder ``engine/assets/sd15``, saved once to ``<root>/sd15-random``), each resolution × batch
size × gradient checkpointing on/off runs ``engine.trainer.Trainer`` for a few steps in a fresh
subprocess, which reports its own ``ru_maxrss`` (peak RSS). Every result is appended to the JSON file
as soon as it is measured (an interrupted sweep keeps what it had), beside what
``engine.fit.estimate.estimate_memory`` predicts for the same config, so the fit can be checked and
re-done: ``--refit`` prints the least-squares coefficients from the file's rows, ``--check`` compares
every row with the estimator as it stands.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FLAGS = dict(mixed_precision="no", save_precision="float", clip_skip=2, network_dim=32, network_alpha=16.0,
             learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, lr_scheduler="constant", seed=42,
             max_train_epochs=None, save_every_n_steps=None, save_every_n_epochs=None, save_state=False,
             cache_latents=False, no_half_vae=True, output_name="bench", device="cpu", optimizer_type="AdamW")


def build_full_model(dest: Path) -> Path:
    """A full-size SD1.5 diffusers folder with random weights (fp32), from the shipped configs."""
    if (dest / "model_index.json").exists():
        return dest
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models import DEFAULT_SD15_CONFIG_DIR as src

    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet")).save_pretrained(tmp / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae")).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder")).save_pretrained(tmp / "text_encoder")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(src / name, tmp / name)
    shutil.copy(src / "model_index.json", tmp / "model_index.json")
    tmp.rename(dest)
    return dest


def dataset_for(root: Path, res: int, batch: int) -> Path:
    from engine.tiny import generate_dataset

    dest = root / f"data-{res}-b{batch}"
    if not (dest / "dataset.toml").exists():
        generate_dataset(dest, num_images=4, num_repeats=1, resolution=res, batch_size=batch)
    return dest / "dataset.toml"


def make_config(model: Path, root: Path, res: int, batch: int, gc: bool, steps: int, **extra):
    from engine.config_io import build_config

    values = dict(FLAGS, pretrained_model_name_or_path=str(model), dataset_config=str(dataset_for(root, res, batch)),
                  output_dir=str(root / "runs" / f"{model.name}-{res}-b{batch}-gc{int(gc)}-{time.time_ns()}"),
                  resolution=str(res), train_batch_size=batch, gradient_checkpointing=gc, max_train_steps=steps)
    values.update(extra)
    return build_config(None, values).validate()


def child(args: argparse.Namespace) -> None:
    from engine.trainer import Trainer

    spec = json.loads(args.child)
    cfg = make_config(Path(spec["model"]), Path(spec["root"]), spec["res"], spec["batch"], spec["gc"], spec["steps"],
                      **spec.get("extra", {}))
    t0 = time.perf_counter()
    result = Trainer(cfg).run()
    print(json.dumps({"status": result.status, "error": str(result.error or ""), "seconds": time.perf_counter() - t0,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"status": "crashed", "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def predicted(spec: dict) -> int:
    from engine.fit.preflight import estimate_memory

    cfg = make_config(Path(spec["model"]), Path(spec["root"]), spec["res"], spec["batch"], spec["gc"], spec["steps"],
                      **spec.get("extra", {}))
    return estimate_memory(cfg, device_type="cpu").peak_bytes


def refit(path: Path, fit: bool, root: Path) -> None:
    """Print the least-squares coefficients (``--refit``) and each row's estimate against its measurement,
    with those coefficients or, for ``--check``, with the ones in engine/fit/estimate.py."""
    from engine.fit.estimate import Settings, estimate, fit_activation_coefficients
    from engine.fit.shapes import model_shapes
    from engine.models import DEFAULT_SD15_CONFIG_DIR

    rows = [r for r in json.loads(path.read_text()) if r.get("status") == "completed"]
    for r in rows:                                  # rows name the models under --root as <root>/...
        r["spec"]["model"] = r["spec"]["model"].replace("<root>", str(root))
    k = fit_activation_coefficients(rows) if fit else None
    if k:
        print(json.dumps(k, indent=2))
    worst = 0.0
    for r in rows:
        spec = r["spec"]
        shapes = model_shapes(spec["model"], DEFAULT_SD15_CONFIG_DIR)
        s = Settings(spec["res"], spec["res"], spec["batch"], spec["gc"], network_dim=32, no_half_vae=True)
        est = estimate(shapes, s, k).peak_bytes
        err = (est - r["peak_rss"]) / r["peak_rss"]
        worst = max(worst, abs(err))
        print(f"{r['model']:5} {spec['res']:4} px batch {spec['batch']} gc {'on ' if spec['gc'] else 'off'}  "
              f"measured {r['peak_rss'] / 1e9:.3f} GB  estimate {est / 1e9:.3f} GB  {err:+.1%}")
    print(f"worst {worst:.1%} over {len(rows)} rows")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None)
    ap.add_argument("--only", choices=("tiny", "full"), default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--res", default="128,256,384")
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--gc", default="1,0")
    ap.add_argument("--out", default=str(REPO / "bench" / "memory_measurements.json"))
    ap.add_argument("--refit", action="store_true", help="fit the coefficients to the file's rows and compare")
    ap.add_argument("--check", action="store_true", help="compare the file's rows with the estimator as it is")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    out = Path(args.out)
    root = Path(args.root) if args.root else Path(tempfile.gettempdir()) / "spyke-bench-memory"
    if args.refit or args.check:
        return refit(out, args.refit, root)
    root.mkdir(parents=True, exist_ok=True)
    from engine.tiny import build_tiny_model

    models = {"tiny": build_tiny_model(root / "tiny-sd15")}
    if args.only != "tiny":
        t0 = time.perf_counter()
        models["full"] = build_full_model(root / "sd15-random")
        print(f"full-size model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.only:
        models = {args.only: models[args.only]}
    rows = json.loads(out.read_text()) if out.exists() else []
    for name, model in models.items():
        for res in (int(r) for r in args.res.split(",")):
            for batch in (int(b) for b in args.batch.split(",")):
                for gc in (g == "1" for g in args.gc.split(",")):
                    spec = dict(model=str(model), root=str(root), res=res, batch=batch, gc=gc, steps=args.steps)
                    got = measure(spec)
                    row = {"model": name, "resolution": res, "batch": batch, "gradient_checkpointing": gc,
                           "steps": args.steps, **got,
                           "spec": dict(spec, model=spec["model"].replace(str(root), "<root>"), root="<root>")}
                    try:
                        row["estimate"] = predicted(spec)
                    except Exception as exc:  # noqa: BLE001 - the bench records whatever happened
                        row["estimate_error"] = str(exc)
                    rows = [r for r in rows if (r["model"], r["resolution"], r["batch"], r["gradient_checkpointing"])
                            != (name, res, batch, gc)] + [row]
                    out.write_text(json.dumps(rows, indent=1) + "\n")
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
