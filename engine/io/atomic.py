"""Atomic writes: a file or a folder is complete at its name or absent, never half-written.

Everything is first written under a temp name in the same folder, ``.{name}.tmp-<pid>-<hex>``
(a folder being replaced is moved aside as ``.{name}.tmp-old-<hex>``), made durable with
fsync, and only then renamed into place; the folder is fsynced after the rename. Checkpoints,
training states and command files are all written through here, so the leftover-temp
cleanup of a later run (:func:`is_temp_name`) recognises every temp name ever written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

TEMP_MARK = ".tmp-"
_ASIDE = f"{TEMP_MARK}old-"
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


def temp_name(name: str, pid: int | None = None) -> str:
    """The name ``name`` is written under before it is renamed into place."""
    return f".{name}{TEMP_MARK}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def aside_name(name: str) -> str:
    """The name a folder is moved aside to while its replacement is renamed in."""
    return f".{name}{_ASIDE}{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """A name :func:`temp_name` writes (not one moved aside)."""
    return bool(_TEMP_RE.match(name))


def aside_original(name: str) -> str | None:
    """The name a folder moved aside by :func:`replace_folder` had, or None when ``name`` is no such name."""
    if not name.startswith(".") or _ASIDE not in name:
        return None
    return name[1:].split(_ASIDE)[0]


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, mode: int = 0o644,
               check: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; ``check(temp path)`` may inspect the written bytes
    (and raise) before they are renamed into place. On any failure the temp file is removed,
    whatever was at ``path`` is untouched, and the error propagates (an ``OSError`` as it is)."""
    path = Path(path)
    folder = path.parent
    tmp = folder / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return path


def replace_folder(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Build the folder ``dest`` atomically: ``fill(temp folder)`` writes its files, which are then
    fsynced; an existing ``dest`` is moved aside, the new one renamed in, the old one removed. On any
    failure the temp folder is removed and the error propagates; ``dest`` stays as it was."""
    dest = Path(dest)
    tmp = dest.with_name(temp_name(dest.name))
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(aside_name(dest.name))
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
