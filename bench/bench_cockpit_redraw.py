"""Cockpit render costs: one panel redraw with 1,000,000 logged steps (target ≤ 20 ms), and the UI
process's CPU while a run sits paused (target ≤ 5 % of a core).

    python -m bench.bench_cockpit_redraw [--steps 1000000] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import psutil

from cockpit.app import CockpitApp
from cockpit.panels import LossPanel, ProgressPanel
from tests.fakes import FakeSource
from cockpit.state import CockpitState, reduce
from engine.config import TrainConfig
from engine.events import CheckpointSaved, PhaseChanged, RunStarted, StepCompleted


def _no_plan(config):
    raise RuntimeError("no preview in this bench")


def feed(app: CockpitApp, steps: int) -> float:
    state = reduce(CockpitState(), RunStarted(run_id="b", output_dir="/o", output_name="b", total_steps=steps * 2,
                                              num_epochs=1, batches_per_epoch=steps * 2, device="cpu", pid=1,
                                              config={}, checkpoint_steps=[steps * 2], t=0.0))
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state = reduce(state, StepCompleted(step=i, epoch=1, loss=1.0 / (1 + i * 1e-5) + (i % 7) * 1e-3,
                                            lrs={"unet": 1e-4}, step_seconds=0.1, t=i * 0.1))
    app.state = reduce(state, CheckpointSaved(path="/o/b.safetensors", step=steps, epoch=1, bytes=1, kind="step"))
    return time.perf_counter() - t0


async def run(args) -> dict:
    config = TrainConfig(pretrained_model_name_or_path="/m", train_data_dir="/d")
    app = CockpitApp(FakeSource(), config=config, planner=_no_plan, presets_dir="/nonexistent")
    out: dict = {}
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        out["reduce_1M_steps_s"] = round(feed(app, args.steps), 2)
        loss = app.screen_stack[0].query_one(LossPanel)
        progress = app.screen_stack[0].query_one(ProgressPanel)
        plot = loss.query_one("#loss-plot")
        times = []
        for i in range(20):
            app.state = reduce(app.state, StepCompleted(step=args.steps + i + 1, epoch=1, loss=0.5, lrs={},
                                                        step_seconds=0.1, t=1e6 + i))
            t0 = time.perf_counter()
            loss.show(app.state, time.time())
            progress.show(app.state, time.time())
            plot.render()                          # the plotext build (what a repaint costs)
            times.append((time.perf_counter() - t0) * 1000)
        out["redraw_ms_median"] = round(statistics.median(times), 2)
        out["redraw_ms_max"] = round(max(times), 2)
        # paused: the engine is idle at a step boundary; only the 4 Hz drain timer runs
        app.source.start(config, app._deliver)
        app._deliver(PhaseChanged(phase="paused", t=time.time()))
        await pilot.pause(0.5)
        proc = psutil.Process()
        proc.cpu_percent(None)
        c0 = proc.cpu_times()
        await asyncio.sleep(args.idle_seconds)
        c1 = proc.cpu_times()
        out["paused_ui_cpu_percent"] = round(100 * ((c1.user - c0.user) + (c1.system - c0.system))
                                             / args.idle_seconds, 2)
        out["screen_says_paused"] = "PAUSED" in str(progress.query_one("#progress-text").render())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
