"""A run's journal, ``<run_dir>/events.jsonl``: the one writer, the one tolerant reader, and the
fast step decoder.

The engine appends one event per line (``{"v":1,"type":"step",...}``, see
:meth:`engine.events.Event.to_json`). The file outlives the process, and a crash can leave a
half-written last line, or a torn line with the next record glued to it: the reader skips the
half line (and picks it up once it is whole) and recovers the glued record.

A long run writes a million step records; viewers read them without building events, with
byte searches that rely on the key order :meth:`Event.to_json` writes. That order is checked
against :class:`StepCompleted`'s fields here, at import, so the encoder and the decoder cannot
drift apart unnoticed.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from engine.events import Event, MemorySample, StepCompleted, event_from_dict

# ---------------------------------------------------------------- the wire format of a step
_STEP_KEYS = ("t", "step", "epoch", "loss")       # the leading keys the fast decoder reads, in order
if tuple(f.name for f in fields(StepCompleted))[:len(_STEP_KEYS)] != _STEP_KEYS:
    raise RuntimeError(f"StepCompleted's fields must start with {_STEP_KEYS}: the journal's step decoder "
                       "reads them in that order")

EVENT_START = b'{"v":'                             # how every record begins
SKIPPED = b'"skipped":true'                        # in a step record whose update was skipped


def type_token(*kinds: type[Event]) -> bytes:
    """The bytes that mark a record of one of ``kinds`` (e.g. ``"type":"step"``), for byte searches."""
    if len(kinds) == 1:
        return b'"type":"' + kinds[0].type.encode() + b'"'
    return b'"type":"(?:' + b"|".join(re.escape(k.type.encode()) for k in kinds) + b')"'


STEP_RE = re.compile(type_token(StepCompleted) + rb',"t":[^,]*,"step":(-?\d+),"epoch":-?\d+,"loss":([^,}]*)')


def _float(raw: bytes) -> float:
    try:
        return float(raw)               # json writes NaN / Infinity / -Infinity, which float() reads
    except ValueError:
        return math.nan


def step_losses(data, start: int, end: int) -> tuple[list[int], list[float]]:
    """(step, loss) of every step record in ``data[start:end]`` without building events."""
    pairs = STEP_RE.findall(data, start, end)
    return [int(s) for s, _ in pairs], [_float(v) for _, v in pairs]


def step_loss(line: bytes) -> tuple[int, float] | None:
    """(step, loss) of one step record, or None when ``line`` is not one."""
    m = STEP_RE.search(line)
    return None if m is None else (int(m.group(1)), _float(m.group(2)))


def line_at(data, pos: int, end: int) -> tuple[int, bytes]:
    """(start, bytes) of the line of ``data`` holding offset ``pos`` (lines end at ``end`` at the latest)."""
    start = data.rfind(b"\n", 0, pos) + 1
    stop = data.find(b"\n", pos, end)
    stop = end if stop < 0 else stop
    return start, bytes(data[start:stop])


# ---------------------------------------------------------------- reading
def parse_line(raw: bytes | str) -> Event | None:
    """One record; a line glued to a torn earlier one (a crash mid-write) still parses."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    raw = raw.strip()
    if not raw:
        return None
    try:
        return event_from_dict(json.loads(raw))
    except (ValueError, AttributeError):
        pass
    cut = raw.rfind(EVENT_START.decode())
    if cut > 0:
        return parse_line(raw[cut:])
    return None


class EventTail:
    """Incremental reader of a journal that may still be growing: keeps its byte offset, leaves a
    half-written last line for the next :meth:`read`, and starts over (``truncated`` becomes True)
    when the file shrinks or is replaced."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""
        self._ident: tuple[int, int] | None = None
        self.truncated = False

    def read(self, max_bytes: int | None = None) -> list[Event]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                ident = (st.st_dev, st.st_ino)
                if self._ident is None:
                    self._ident = ident
                if ident != self._ident or st.st_size < self.offset:
                    self._ident, self.offset, self._partial = ident, 0, b""
                    self.truncated = True
                if st.st_size == self.offset:
                    return []
                fh.seek(self.offset)
                chunk = fh.read() if max_bytes is None else fh.read(max_bytes)
        except OSError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [e for e in map(parse_line, lines) if e is not None]


def read_events(path: Path) -> list[Event]:
    """Every complete event in a file (a torn last line is skipped)."""
    return EventTail(path).read()


def first_event(path: Path) -> Event | None:
    with open(path, "rb") as fh:
        return parse_line(fh.readline())


def last_events(path: Path, nbytes: int) -> list[Event]:
    """The events in the last ``nbytes`` of a file (the first line there may be cut, and is dropped)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - nbytes))
        data = fh.read()
    lines: Sequence[bytes] = data.split(b"\n")
    if size > nbytes:
        lines = lines[1:]
    return [e for e in map(parse_line, lines) if e is not None]


# ---------------------------------------------------------------- writing
class EventLog:
    """Append-only journal writer. Each event is one ``write`` of a whole line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    def __call__(self, event: Event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line)
            self._fh.flush()
            now = time.monotonic()
            if not isinstance(event, (StepCompleted, MemorySample)) or now - self._last_sync > 5.0:
                os.fsync(self._fh.fileno())
                self._last_sync = now

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
