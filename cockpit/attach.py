"""``spyke-cockpit attach [RUN] [--read-only] [--root DIR]``: the cockpit on a run folder.

The app (:class:`cockpit.attach_app.AttachApp`) is the cockpit's monitor on a
:class:`cockpit.viewer.tail.TailSource`, which reads the run's journal (see :mod:`cockpit.viewer`), so the
run itself knows nothing about its viewers. This module stays free of Textual: :func:`make_app` forks the
snapshot prefetch first, then imports the app.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from cockpit.pace import BUSY_FACTOR, PLOT_EVERY, VIEW_INTERVAL
from cockpit.viewer.prefetch import SnapshotPrefetch
from cockpit.viewer.tail import TailSource
from engine.api import EVENTS_FILENAME as EVENTS, resolve_run

REFRESH_RANGE = (0.25, 60.0)   # what --refresh accepts, in seconds


def make_app(run_dir: Path, *, read_only: bool = False, prefetch: bool = False, **kwargs: Any):
    # the prefetch forks before Textual is imported (by cockpit.attach_app)
    snapshot = SnapshotPrefetch(Path(run_dir) / EVENTS) if prefetch and (Path(run_dir) / EVENTS).is_file() else None
    source = TailSource(run_dir, read_only=read_only, prefetch=snapshot)
    from cockpit.attach_app import AttachApp       # Textual: after the fork

    return AttachApp(source, read_only=read_only, **kwargs)


def _refresh_seconds(text: str) -> float:
    low, high = REFRESH_RANGE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds from {low:g} to {high:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spyke-cockpit attach",
        description="Watch and steer a training run from its run folder (any terminal, any number of viewers).")
    parser.add_argument("run", nargs="?", help="run folder, its events.jsonl, a folder of runs, or a run id "
                                               "(default: the most recent live run under --root)")
    parser.add_argument("--read-only", action="store_true", help="watch only: pause/save/abort are refused")
    parser.add_argument("--refresh", type=_refresh_seconds, default=VIEW_INTERVAL, metavar="SECONDS",
                        help=f"seconds between redraws (default {VIEW_INTERVAL:g}; the chart every {PLOT_EVERY}th; "
                             f"{BUSY_FACTOR}x slower while less than half a CPU core is idle, leaving the CPU to the "
                             "training); keys act at once, pause, checkpoints and the finish show within a second")
    parser.add_argument("--root", help="where to look for runs (default: $SPYKE_RUNS_ROOT, else runs_root in "
                                       "~/.config/spyke-cockpit/config.toml, else the current folder)")
    return parser


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    run_dir = resolve_run(ns.run, ns.root)
    app = make_app(run_dir, read_only=ns.read_only, prefetch=True, refresh=ns.refresh)
    from cockpit.hangup import HangupGuard

    guard = HangupGuard(app)
    with guard:
        result = app.run()
    if app.lifeline.ending:         # told to end (a signal, serve gone): a viewer has nothing to save
        app.lifeline.finish()
    app.source.stop()
    if guard.hung_up:
        guard.detach(wait=None)
        return 0
    return int(result or 0)
