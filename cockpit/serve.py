"""``spyke-cockpit serve``: the cockpit's view of a run in a web browser (textual-serve).

Bound to 127.0.0.1 by default: reach it from another machine through an SSH tunnel
(``ssh -L 8000:127.0.0.1:8000 box``), not by opening a port.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence


def serve_command(run: str | None, read_only: bool) -> str:
    parts = [sys.executable, "-m", "cockpit.cli", "attach"]
    if run:
        parts.append(run)
    if read_only:
        parts.append("--read-only")
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="spyke-cockpit serve",
                                     description="Serve `spyke-cockpit attach` to a web browser.")
    parser.add_argument("run", nargs="?", default=None,
                        help="run folder (default: the most recent live run under the runs root, as for attach)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--read-only", action="store_true", help="browser viewers cannot pause/save/abort")
    ns = parser.parse_args(list(argv))
    from textual_serve.server import Server

    print(f"serving the cockpit on http://{ns.host}:{ns.port} (Ctrl-C to stop)", flush=True)
    Server(serve_command(ns.run, ns.read_only), host=ns.host, port=ns.port, title="spyke-cockpit").serve()
    return 0
