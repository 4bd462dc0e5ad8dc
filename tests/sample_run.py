"""A finished fake run with sample images and validation losses, written as the engine writes one."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from engine.api import CheckpointSaved, PhaseChanged, RunFinished, RunStarted, SamplesSaved, StepCompleted, ValidationLoss

PROMPTS = ["a photo of sks person", "sks person in a forest", "portrait of sks person, oil painting"]
STEPS = (200, 400, 600)
VALIDATION = {200: 0.1421, 400: 0.1187, 600: 0.1302}      # step 400 is the best
T0 = 1_700_000_000.0


def sample_png(path: Path, step: int, index: int, size: int = 64) -> None:
    """A small picture that differs per checkpoint and prompt (a coloured gradient)."""
    image = Image.new("RGB", (size, size))
    r, g, b = (step * 37) % 256, (index * 90 + 40) % 256, (step // 2 + index * 60) % 256
    image.putdata([((r + x * 2) % 256, (g + y * 3) % 256, b) for y in range(size) for x in range(size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_sample_run(root: Path, *, pid: int = 1, validation: bool = True) -> Path:
    """<root>/out/.spyke/cmp-run with 3 checkpoints, 3 sample sets of 3 prompts, 3 validation losses."""
    out = root / "out"
    run_dir = out / ".spyke" / "cmp-run"
    (run_dir / "control").mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    events = [RunStarted(run_id="cmp-run", output_dir=str(out), output_name="sks", total_steps=600, num_epochs=3,
                         batches_per_epoch=200, device="cpu", pid=pid, config={}, checkpoint_steps=list(STEPS),
                         t=T0),
              PhaseChanged(phase="training", t=T0 + 1)]
    for k, step in enumerate(STEPS):
        t = T0 + 10 * (k + 1)
        events.append(StepCompleted(step=step, epoch=k + 1, loss=0.2 - 0.01 * k, lrs={"unet": 1e-4},
                                    step_seconds=0.1, t=t))
        name = "sks.safetensors" if step == STEPS[-1] else f"sks-step{step:08d}.safetensors"
        ckpt = str(out / name)
        events.append(CheckpointSaved(path=ckpt, step=step, epoch=k + 1, bytes=9_650_000, kind="step",
                                      loss=0.2 - 0.01 * k, verified=True, t=t))
        paths = []
        for i in range(len(PROMPTS)):
            png = out / "sample" / f"sks_{step:06d}_{i:02d}_20240101000000_{1234 + i}.png"
            sample_png(png, step, i)
            paths.append(str(png))
        events.append(SamplesSaved(step=step, epoch=k + 1, paths=paths, prompts=list(PROMPTS),
                                   seeds=[1234 + i for i in range(len(PROMPTS))], checkpoint=ckpt, seconds=1.5,
                                   t=t + 1))
        if validation:
            events.append(ValidationLoss(step=step, epoch=k + 1, loss=VALIDATION[step], images=4, checkpoint=ckpt,
                                         t=t + 2))
    events.append(RunFinished(status="completed", step=STEPS[-1], final_path=str(out / "sks.safetensors"),
                              t=T0 + 100))
    with open(run_dir / "events.jsonl", "w") as fh:
        for event in events:
            fh.write(event.to_json() + "\n")
    return run_dir
