"""Which ``.ckpt``/``.pt`` checkpoints a run wrote: kohya's torch.save files carry no metadata, so the
run's own id and step (``ss_session_id``/``ss_steps`` in a ``.safetensors``) are kept in its run folder
instead, ``<output_dir>/.spyke/<run_id>/written.json``: name -> step, size and modification time.

A file counts as the run's only while its size and modification time are the ones recorded after the
write, so a file put at that name later (copied, rewritten by another run) is not taken for the run's.
Light: no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.io.atomic import write_file
from engine.run.folder import RUNS_DIRNAME

WRITTEN_FILE = "written.json"


def _record_path(output_dir: Path, run_id: str) -> Path:
    return Path(output_dir) / RUNS_DIRNAME / run_id / WRITTEN_FILE


def _read(output_dir: Path, run_id: str) -> dict[str, dict]:
    try:
        raw = json.loads(_record_path(output_dir, run_id).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write(output_dir: Path, run_id: str, records: dict[str, dict]) -> None:
    path = _record_path(output_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(records, indent=1).encode())


def _stamp(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_written(path: Path, run_id: str, step: int) -> None:
    """``path`` (in the output folder) was just written by ``run_id`` at ``step``."""
    path = Path(path)
    records = _read(path.parent, run_id)
    records[path.name] = {"step": int(step), **_stamp(path)}
    _write(path.parent, run_id, records)


def written_step(path: Path, run_id: str) -> int | None:
    """The step at which ``run_id`` wrote the file now at ``path``; None when it did not (or it changed)."""
    path = Path(path)
    if not run_id:
        return None
    entry = _read(path.parent, run_id).get(path.name)
    try:
        if not isinstance(entry, dict) or _stamp(path) != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
            return None
        return int(entry["step"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def moved_written(src: Path, dst: Path, run_id: str) -> None:
    """The run's file ``src`` was renamed to ``dst`` (same folder; a rename keeps size and time)."""
    records = _read(Path(src).parent, run_id)
    if Path(src).name in records:
        records[Path(dst).name] = records.pop(Path(src).name)
        _write(Path(src).parent, run_id, records)
