"""The samples panel's cost: a cockpit redraw (all panels, then the screen painted) while training, with
the panel showing three 512×512 samples vs hidden, and one thumbnail drawn cold vs from the cache.

    python -m bench.bench_samples_panel [--redraws 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from cockpit.app import CockpitApp
from cockpit.images import _cache, halfblock_strips
from engine.config import TrainConfig
from engine.events import PhaseChanged, RunStarted, SamplesSaved, StepCompleted
from tests.fakes import FakeSource


def _no_plan(config):
    raise RuntimeError("no preview in this bench")


def pngs(folder: Path, n: int = 3) -> list[str]:
    rnd = random.Random(0)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (512, 512))
        image.putdata([((x + i * 40) % 256, (y * 2) % 256, rnd.randrange(256)) for y in range(512) for x in range(512)])
        path = folder / f"s_{i:02d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


async def redraws(app, pilot, first_step: int, n: int) -> list[float]:
    times = []
    for i in range(n):
        app._deliver(StepCompleted(step=first_step + i, epoch=1, loss=0.5, lrs={"unet": 1e-4}, step_seconds=0.1,
                                   t=time.time()))
        app._rendered_at = float("-inf")            # draw every step (the cockpit paces to 2 Hz)
        t0 = time.perf_counter()
        app.drain()
        await pilot.pause()                         # the compositor paints what changed
        times.append((time.perf_counter() - t0) * 1000)
    return times


async def run(args) -> dict:
    folder = Path(tempfile.mkdtemp())
    paths = pngs(folder)
    out: dict = {}
    t0 = time.perf_counter()
    halfblock_strips(paths[0], 32, 16)
    out["thumbnail_32x16_cold_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    t0 = time.perf_counter()
    halfblock_strips(paths[0], 32, 16)
    out["thumbnail_32x16_cached_ms"] = round((time.perf_counter() - t0) * 1000, 4)
    _cache.clear()
    config = TrainConfig(pretrained_model_name_or_path="/m", train_data_dir="/d")
    app = CockpitApp(FakeSource(), config=config, planner=_no_plan, presets_dir="/nonexistent")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        app.source.start(config, app._deliver)
        app._deliver(RunStarted(run_id="b", output_dir=str(folder), output_name="b", total_steps=100000,
                                num_epochs=1, batches_per_epoch=100000, device="cpu", pid=1, config={}, t=time.time()))
        app._deliver(PhaseChanged(phase="training", t=time.time()))
        app.drain()
        await pilot.pause(0.3)
        hidden = await redraws(app, pilot, 1, args.redraws)
        app._deliver(SamplesSaved(step=args.redraws, epoch=1, paths=paths, prompts=["a", "b", "c"],
                                  seeds=[1, 2, 3], t=time.time()))
        app.drain()
        await pilot.pause(0.5)
        assert app.samples_visible
        shown = await redraws(app, pilot, args.redraws + 1, args.redraws)
        app.set_samples_visible(False)
        await pilot.pause(0.3)
        hidden_again = await redraws(app, pilot, 2 * args.redraws + 1, args.redraws)
    out["redraw_ms_median_hidden"] = round(statistics.median(hidden + hidden_again), 2)
    out["redraw_ms_median_visible"] = round(statistics.median(shown), 2)
    out["redraw_ms_p90_hidden"] = round(sorted(hidden + hidden_again)[int(0.9 * 2 * args.redraws)], 2)
    out["redraw_ms_p90_visible"] = round(sorted(shown)[int(0.9 * args.redraws)], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redraws", type=int, default=40)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
