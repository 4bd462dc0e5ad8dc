"""A run's control channel: command files in ``<run_dir>/control/``.

Only the run's owner can use it: the run folder is 0700, command files are 0600 and
the engine applies a file only when its owner is the engine's own user. A command is
written atomically (temp name, then rename) and deleted once applied, so it is applied
exactly once. Nothing listens on the network.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from engine.control import Command, TrainingControl
from engine.errors import SpykeError
from engine.io.atomic import write_file
from engine.run.layout import CONTROL_DIRNAME


class ControlChannel:
    """Engine side: apply pending command files to a TrainingControl (call ``poll`` often)."""

    def __init__(self, run_dir: Path, control: TrainingControl, on_command=None) -> None:
        self.dir = Path(run_dir) / CONTROL_DIRNAME
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.control = control
        self.on_command = on_command
        self._uid = os.getuid() if hasattr(os, "getuid") else None

    def poll(self) -> int:
        applied = 0
        try:
            names = sorted(e.name for e in os.scandir(self.dir) if e.name.endswith(".json"))
        except OSError:
            return 0
        for name in names:
            path = self.dir / name
            try:
                st = path.stat()
                if self._uid is not None and st.st_uid != self._uid:
                    path.unlink(missing_ok=True)
                    continue
                data = json.loads(path.read_text())
                path.unlink(missing_ok=True)
                command = Command(data["command"])
            except (OSError, ValueError, KeyError):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
                continue
            self.control.submit(command)
            applied += 1
            if self.on_command is not None:
                self.on_command(command, data.get("sender", ""))
        return applied


def send_command(run_dir: Path, command: Command | str, sender: str = "") -> Path:
    """Viewer side: queue ``command`` for the run in ``run_dir``. Raises SpykeError if it cannot."""
    command = Command(command)
    folder = Path(run_dir) / CONTROL_DIRNAME
    if not folder.is_dir():
        raise SpykeError(f"{run_dir}: this run has no control channel (is it a spyke-cockpit run folder?)")
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    data = json.dumps({"command": command.value, "sender": sender, "t": time.time()}).encode()
    return write_file(folder / name, data, mode=0o600)
