"""Find runs and tell their state from their run folders (``<output_dir>/.spyke/<run_id>/``): the runs
root, liveness of a run's process, one run's summary, and the run folder a user means."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engine.errors import SpykeError
from engine.events import PhaseChanged, RunFinished, RunStarted, StepCompleted
from engine.run.journal import first_event, last_events, parse_line
from engine.run.layout import EVENTS_FILENAME as EVENTS, RUNS_DIRNAME

TAIL_BYTES = 256 * 1024
RUNS_ROOT_ENV = "SPYKE_RUNS_ROOT"
USER_CONFIG_KEYS = ("runs_root",)


def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/spyke-cockpit/config.toml`` (``~/.config/...`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spyke-cockpit" / "config.toml"


def default_runs_root() -> Path:
    """Where ``attach``, ``ls`` and ``serve`` look for runs when given no folder:
    ``$SPYKE_RUNS_ROOT``, else ``runs_root`` in the user config file, else the current folder."""
    value = os.environ.get(RUNS_ROOT_ENV)
    if value:
        where, path = f"${RUNS_ROOT_ENV}", Path(value).expanduser()
    else:
        cfg = user_config_path()
        if not cfg.is_file():
            return Path.cwd()
        try:
            data = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise SpykeError(f"{cfg}: cannot read it ({err}); fix or remove the file") from None
        unknown = sorted(set(data) - set(USER_CONFIG_KEYS))
        if unknown:
            raise SpykeError(f"{cfg}: unknown setting '{unknown[0]}' (known: {', '.join(USER_CONFIG_KEYS)})")
        value = data.get("runs_root")
        if value is None:
            return Path.cwd()
        if not isinstance(value, str) or not value.strip():
            raise SpykeError(f'{cfg}: runs_root must be a folder path in quotes, e.g. runs_root = "~/loras"')
        where, path = f"{cfg} (runs_root)", Path(value).expanduser()
        if not path.is_absolute():
            path = cfg.parent / path                   # relative to the config file, not to wherever you are
    if not path.is_dir():
        raise SpykeError(f"{where}: {path} is not a folder; create it or change the setting")
    return path


@dataclass
class RunInfo:
    run_dir: Path
    run_id: str
    state: str                 # live | paused | finished | aborted | failed | stale
    step: int
    total: int
    last_loss: float | None
    started: float | None
    pid: int | None
    output_name: str = ""


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A reused pid belongs to a process created after our run started.
        return started is None or proc.create_time() <= started + 1.0
    except Exception:  # noqa: BLE001 - no such process, or no access
        return False


def _first_event(path: Path):
    return first_event(path)


def _tail_events(path: Path, nbytes: int = TAIL_BYTES):
    return last_events(path, nbytes)


def summarize(run_dir: Path) -> RunInfo | None:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return None
    try:
        first = _first_event(path)
        tail = _tail_events(path)
    except OSError:
        return None
    if not isinstance(first, RunStarted):
        return None
    step, loss, phase, finished = first.start_step, None, None, None
    latest = first                 # a resumed run appends a new start (new pid) to the same file
    for event in tail:
        if isinstance(event, RunStarted):
            latest, finished, phase, step = event, None, None, event.start_step
        elif isinstance(event, StepCompleted):
            step, loss = event.step, event.loss
        elif isinstance(event, PhaseChanged):
            phase = event.phase
        elif isinstance(event, RunFinished):
            finished = event
            step = event.step
    if finished is not None:
        state = {"completed": "finished"}.get(finished.status, finished.status)
    elif pid_alive(latest.pid, latest.t):
        state = "paused" if phase == "paused" else "live"
    else:
        state = "stale"
    return RunInfo(Path(run_dir), first.run_id, state, step, latest.total_steps, loss, first.t, latest.pid,
                   first.output_name)


def check_readable(run_dir: Path) -> Path:
    """``run_dir`` if its events.jsonl holds spyke-cockpit events, else a one-line SpykeError saying how
    many of its lines could be read. An empty file, or a last line still being written, is a live run's."""
    path = Path(run_dir) / EVENTS
    try:
        with open(path, "rb") as fh:
            data = fh.read(TAIL_BYTES + 1)
    except OSError as err:
        raise SpykeError(f"{path}: cannot read it ({err.strerror or err})") from None
    cut = len(data) > TAIL_BYTES
    lines = data[:TAIL_BYTES].split(b"\n")
    last = lines.pop()                     # no newline yet: being written (or cut by the read limit)
    lines = [raw for raw in lines if raw.strip()]
    if any(parse_line(raw) is not None for raw in lines):
        return Path(run_dir)               # one event is enough: the cockpit skips lines it cannot read
    if not lines and (not last.strip() or last.lstrip().startswith(b"{")):
        return Path(run_dir)               # empty, or its first event is being written
    total = len(lines) + (1 if last.strip() else 0)
    of = f"the first {total}" if cut else str(total)
    raise SpykeError(f"{path}: not a spyke-cockpit run (0 of {of} line{'s' if total != 1 else ''} readable)")


def find_run_dirs(root: Path, max_depth: int = 4) -> list[Path]:
    """Run folders under ``root`` (``root`` itself may be a run folder, an output dir or above)."""
    root = Path(root)
    if (root / EVENTS).is_file():
        return [root]
    found: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, _files in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        if Path(dirpath).name == RUNS_DIRNAME:
            found += [Path(dirpath) / d for d in dirnames if (Path(dirpath) / d / EVENTS).is_file()]
            dirnames[:] = []
            continue
        if depth >= max_depth:
            dirnames[:] = []
        else:
            dirnames[:] = [d for d in dirnames if d == RUNS_DIRNAME or not d.startswith(".")]
    return found


def list_runs(root: Path) -> list[RunInfo]:
    infos = [i for i in (summarize(d) for d in find_run_dirs(root)) if i is not None]
    return sorted(infos, key=lambda i: i.started or 0.0, reverse=True)


def latest_live_run(root: Path) -> RunInfo | None:
    runs = list_runs(root)
    live = [r for r in runs if r.state in ("live", "paused")]
    return (live or runs or [None])[0]


def resolve_run(run: str | None, root: str | None = None) -> Path:
    """A run folder from what the user typed: a run folder, its events.jsonl, a folder holding
    runs (the most recent live one is picked), or a run id under ``root`` (default: the runs root
    from $SPYKE_RUNS_ROOT or the user config file, else the current folder)."""
    base = Path(root) if root else default_runs_root()
    if run is None:
        info = latest_live_run(base)
        if info is None:
            raise SpykeError(f"no runs under {base.resolve()}; pass a run folder, or --root DIR "
                             "(start one with `spyke-cockpit train --detach CONFIG`)")
        return info.run_dir
    path = Path(run).expanduser()
    if path.name == EVENTS and path.is_file():
        return check_readable(path.parent)
    if path.is_dir():
        if (path / EVENTS).is_file():
            return check_readable(path)
        info = latest_live_run(path)
        if info is None:
            raise SpykeError(f"{path}: no spyke-cockpit runs in this folder (see `spyke-cockpit ls {path}`)")
        return info.run_dir
    matches = [d for d in find_run_dirs(base) if d.name == run or d.name.startswith(run)]
    if len(matches) == 1:
        return check_readable(matches[0])
    if matches:
        raise SpykeError(f"run '{run}' matches {len(matches)} runs under {base.resolve()}; pass its folder")
    raise SpykeError(f"run '{run}': no such run folder or run id under {base.resolve()} "
                     "(see `spyke-cockpit ls`, or pass --root DIR)")
