"""A run's own folder, ``<output_dir>/.spyke/<run_id>/``: where it is, who may read it, what is in it.

The folder and ``.spyke`` above it are 0700 (only the run's owner reads its events and sends it
commands). It holds the run's settings (``config.toml``), the detached launcher's settings
(``launch.toml``) and terminal output (``console.log``), the events (``events.jsonl``), the
control channel (``control/``) and, after an unexpected error, its traceback (``error.log``).

It also owns the command that resumes the run (:func:`resume_command`): its own ``config.toml``
with ``--resume`` and a state folder, complete and runnable as printed.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import uuid
from pathlib import Path

RUNS_DIRNAME = ".spyke"
CONFIG_FILE = "config.toml"
LAUNCH_FILE = "launch.toml"
CONSOLE_LOG = "console.log"
ERROR_LOG = "error.log"
EVENTS_FILE = "events.jsonl"


def new_run_id(output_name: str) -> str:
    """``<YYYYmmdd-HHMMSS>-<output_name>-<4 hex>``: sorts by start time, says what it trains."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{output_name}-{uuid.uuid4().hex[:4]}"


def resume_command(output_dir: Path | str, run_id: str, state_dir: Path | str) -> str:
    """The full command that resumes run ``run_id`` from ``state_dir``: the run's own settings, as it
    trained them (``config.toml`` in its folder), and ``--resume``; paths quoted for a POSIX shell."""
    config = Path(output_dir) / RUNS_DIRNAME / run_id / CONFIG_FILE
    return f"spyke-cockpit train --headless {shlex.quote(str(config))} --resume {shlex.quote(str(state_dir))}"


class RunFolder:
    """``<output_dir>/.spyke/<run_id>/`` of one run."""

    def __init__(self, output_dir: Path | str, run_id: str) -> None:
        self.output_dir = Path(output_dir)
        self.run_id = run_id
        self.path = self.output_dir / RUNS_DIRNAME / run_id

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def console_log(self) -> Path:
        return self.path / CONSOLE_LOG

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def resume_command(self, state_dir: Path | str) -> str:
        """The command that resumes this run from ``state_dir`` (see :func:`resume_command`)."""
        return resume_command(self.output_dir, self.run_id, state_dir)

    def create(self) -> bool:
        """Make the folder and ``.spyke`` 0700 (OSError when it cannot be made); True when it was new."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.path.parent, 0o700)
            os.chmod(self.path, 0o700)
        except OSError:
            pass  # a file system without modes: the folder still works
        return created

    def write_config(self, toml: str) -> Path:
        """The run's resolved settings, as it trains them."""
        path = self.config_path
        path.write_text(toml)
        return path

    def write_launch(self, toml: str) -> Path:
        """The settings a detached run is started with."""
        path = self.path / LAUNCH_FILE
        path.write_text(toml)
        return path

    def write_trace(self, text: str) -> None:
        """An unexpected error's traceback; never fails the run that is already failing."""
        try:
            (self.path / ERROR_LOG).write_text(text)
        except OSError:
            pass

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
