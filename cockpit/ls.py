"""``spyke-cockpit ls [FOLDER | --root DIR] [--json]``: the runs under a folder, newest first."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Sequence

from engine.api import RUNS_ROOT_ENV, RunInfo, SpykeError, default_runs_root, list_runs, user_config_path


def format_table(runs: Sequence[RunInfo]) -> str:
    rows = [("RUN", "STATE", "STEP", "LOSS", "STARTED", "PID", "FOLDER")]
    for r in runs:
        started = dt.datetime.fromtimestamp(r.started).strftime("%Y-%m-%d %H:%M") if r.started else "-"
        loss = f"{r.last_loss:.4f}" if r.last_loss is not None else "-"
        rows.append((r.run_id, r.state, f"{r.step}/{r.total}", loss, started, str(r.pid or "-"), str(r.run_dir)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spyke-cockpit ls", description="List training runs under a folder.")
    where = f"${RUNS_ROOT_ENV}, else runs_root in {user_config_path()}, else the current folder"
    parser.add_argument("folder", nargs="?", default=None, help=f"where to look (default: {where})")
    parser.add_argument("--root", metavar="DIR", help="where to look, as for attach and serve (the same as FOLDER)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    return parser


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    if ns.folder and ns.root and Path(ns.folder) != Path(ns.root):
        raise SpykeError(f"ls {ns.folder} --root {ns.root}: two folders to list; give FOLDER or --root DIR")
    given = ns.folder or ns.root
    ns.folder = Path(given).expanduser() if given else default_runs_root()
    runs = list_runs(ns.folder)
    if ns.json:
        for r in runs:
            print(json.dumps({**r.__dict__, "run_dir": str(r.run_dir)}))
    elif not runs:
        print(f"no runs under {Path(ns.folder).resolve()}")
    else:
        print(format_table(runs))
    return 0
