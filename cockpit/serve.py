"""``spyke-cockpit serve``: the cockpit's view of a run in a web browser (textual-serve).

Bound to 127.0.0.1 by default: reach it from another machine through an SSH tunnel
(``ssh -L 8000:127.0.0.1:8000 box``), not by opening a port.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import socket
import sys
from typing import Sequence

from engine.errors import SpykeError


def serve_command(run: str | None, read_only: bool, root: str | None = None) -> str:
    """The shell command textual-serve runs per tab: ``exec`` makes its process the viewer itself."""
    parts = [sys.executable, "-m", "cockpit.cli", "attach"]
    if run:
        parts.append(run)
    if root:
        parts += ["--root", root]
    if read_only:
        parts.append("--read-only")
    return "exec " + " ".join(shlex.quote(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spyke-cockpit serve",
                                     description="Serve the attach view of a run to a web browser (one viewer per "
                                                 "tab; each ends when its tab closes or serve stops).")
    parser.add_argument("run", nargs="?", default=None,
                        help="run folder (default: the most recent live run under the runs root, as for attach)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", default="8000", help="port to listen on, 1..65535 (default 8000)")
    parser.add_argument("--read-only", action="store_true", help="browser viewers cannot pause/save/abort")
    parser.add_argument("--root", metavar="DIR",
                        help="where to look for runs (default: $SPYKE_RUNS_ROOT, else runs_root in "
                             "~/.config/spyke-cockpit/config.toml, else the current folder)")
    return parser


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    from engine.api import resolve_run

    port = check_port(ns.host, ns.port)
    resolve_run(ns.run, ns.root)  # the browser would only show the error: say it here
    from cockpit.viewer_server import ViewerServer

    print(f"serving the cockpit on http://{ns.host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        ViewerServer(serve_command(ns.run, ns.read_only, ns.root), host=ns.host, port=port, title="spyke-cockpit").serve()
    except OSError as err:        # taken between the check and the server's own bind
        raise SpykeError(f"--port={port}: cannot listen on {ns.host}:{port} ({err.strerror or err})") from None
    return 0


def check_port(host: str, text: str) -> int:
    """``text`` as a port that ``host`` can listen on now, else a one-line SpykeError."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise SpykeError(f"--port={text}: not a port number; use 1..65535 (default 8000)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise SpykeError(f"--host={host}: not an address this machine can listen on ({err}); "
                         "use 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise SpykeError(f"--port={port}: {host}:{port} is already in use; pick another --port") from None
            if err.errno == errno.EACCES:
                raise SpykeError(f"--port={port}: not allowed to listen on {host}:{port}; "
                                 "use a port above 1023") from None
            raise SpykeError(f"--host={host} --port={port}: cannot listen there ({err.strerror or err})") from None
    return port
