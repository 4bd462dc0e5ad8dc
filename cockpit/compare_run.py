"""``spyke-cockpit compare RUN [--sheet OUT.png [--overwrite]]``: choose a checkpoint of a run folder.

The run's events are read as ``attach`` reads them (:func:`cockpit.viewer.snapshot.load_snapshot`,
folded by the cockpit's reducer), so the grid is the one the live cockpit's ``c`` shows. Without
``--sheet`` the compare screen opens (:mod:`cockpit.compare`); with it, the grid is written as one PNG
(:mod:`cockpit.sheet`) and no screen is opened. This module loads neither Textual nor torch itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from cockpit.samples import compare_rows
from cockpit.state import CockpitState, reduce_all
from cockpit.viewer.snapshot import load_snapshot
from engine.api import EVENTS_FILENAME, SpykeError, format_bytes, resolve_run


def load_run_state(run_dir: Path) -> CockpitState:
    """The cockpit state of a run folder, from its events.jsonl."""
    path = Path(run_dir) / EVENTS_FILENAME
    if not path.is_file():
        raise SpykeError(f"{run_dir}: no {EVENTS_FILENAME} here; pass a run folder (see `spyke-cockpit ls`)")
    return reduce_all(CockpitState(), load_snapshot(path).actions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spyke-cockpit compare",
        description="Compare a run's checkpoints side by side: sample images per prompt, validation loss "
                    "(the lowest marked ★).")
    parser.add_argument("run", help="run folder, its events.jsonl, a folder of runs, or a run id")
    parser.add_argument("--sheet", metavar="OUT.png", help="write the grid as one PNG contact sheet instead of "
                                                          "opening the screen")
    parser.add_argument("--overwrite", action="store_true", help="with --sheet: replace an existing file")
    parser.add_argument("--root", help="where to look for runs (as for `spyke-cockpit attach`)")
    return parser


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    if ns.overwrite and not ns.sheet:
        raise SpykeError("--overwrite goes with --sheet OUT.png")
    run_dir = resolve_run(ns.run, ns.root)
    state = load_run_state(run_dir)
    if ns.sheet:
        from cockpit.sheet import write_sheet

        rows = compare_rows(state.sample_book, state.checkpoints, base=state.output_dir)
        path, (width, height), size = write_sheet(rows, state.sample_book.prompts, Path(ns.sheet),
                                                  overwrite=ns.overwrite)
        print(f"wrote {path} ({width}×{height} px, {format_bytes(size)})")
        return 0
    from cockpit.compare import CompareApp

    return int(CompareApp(state, title=state.output_name or run_dir.name).run() or 0)
