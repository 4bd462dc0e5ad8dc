"""First frame of the cockpit's form after launch (target ≤ 1.0 s), and that torch is not imported by then.

Runs a fresh interpreter per sample: ``python -m bench.bench_cockpit_first_frame [--runs N]``.
The child starts the real app (live source, demo off) headless at 120×40 and records the
wall time from process launch to the first screen update written to the terminal driver.
The clock starts in the parent just before the launch (``SPAWN_T``): psutil's process
creation time rests on /proc/stat's whole-second boot time and was 0.4 s early on this box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, sys, time, json
born = float(os.environ["SPAWN_T"])
from cockpit.app import CockpitApp
from cockpit.sources import LiveSource

class Probe(CockpitApp):
    _t = None
    def _display(self, screen, renderable):
        # the first frame is the first screen update written to the terminal driver
        super()._display(screen, renderable)
        if renderable is not None and self._t is None and screen is self.screen and self.screen.is_mounted:
            self._t = time.time() - born
            self._torch = "torch" in sys.modules
            self.set_timer(0.5, lambda: self.exit(0))

app = Probe(LiveSource())
app.run(headless=True, size=(120, 40))
print(json.dumps({"first_frame_s": app._t, "torch_loaded": app._torch}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    samples = []
    for _ in range(args.runs):
        env = dict(os.environ, SPAWN_T=repr(time.time()))
        out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
                             env=env)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    times = [s["first_frame_s"] for s in samples]
    print(json.dumps({"runs": len(times), "median_s": round(statistics.median(times), 3),
                      "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                      "torch_loaded_before_first_frame": any(s["torch_loaded"] for s in samples)}))


if __name__ == "__main__":
    main()
