"""The cockpit's only door into the engine.

Everything ``cockpit/`` uses from ``engine/`` is named here: the config model, planning and
starting a run, the demo, the events, the commands, the run folder (journal, command channel,
registry) and the formatting the screens share with the headless output. ``engine.errors`` (the
error classes, a leaf module) is part of the door too, so that ``cockpit.cli`` can catch
:class:`SpykeError` without loading the config model. The contract in ``pyproject.toml``
(``[tool.importlinter]``, run by tests/test_import_hygiene.py) keeps it so.

Importing this module is light (no torch): what needs torch (a run, the demo model, the
headless loop) is imported when it is called, on whichever thread calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from engine.cli_args import make_parser, overrides_from_namespace, parse_flags, parse_train_args
from engine.config import FIELDS, GROUPS, TrainConfig, field_is_optional, field_type, fields_in_group
from engine.config_io import build_config, coerce_value, to_toml
from engine.control import Command, Commands
from engine.errors import ConfigError, ModelLoadError, SpykeError
from engine.fit.advice import change_flags
from engine.events import (EVENT_TYPES, PHASES, CheckpointRemoved, CheckpointSaved, Event, LogMessage, MemorySample, PhaseChanged,
                           RunFinished, RunStarted, SamplesSaved, StepCompleted, ValidationLoss)
from engine.io.atomic import write_file
from engine.run.channel import send_command
from engine.run.folder import resume_command
from engine.run.journal import EventTail, line_at, parse_line, step_loss, step_losses, type_token, SKIPPED
from engine.run.layout import CONSOLE_FILENAME, CONTROL_DIRNAME, EVENTS_FILENAME, RUNS_DIRNAME
from engine.run.registry import (RUNS_ROOT_ENV, RunInfo, default_runs_root, list_runs, pid_alive, resolve_run,
                                 user_config_path)
from engine.units import format_bytes

__all__ = [
    "EVENT_TYPES", "FIELDS", "GROUPS", "PHASES", "CONSOLE_FILENAME", "CONTROL_DIRNAME", "EVENTS_FILENAME",
    "RUNS_DIRNAME",
    "RUNS_ROOT_ENV", "SKIPPED", "CheckpointRemoved", "CheckpointSaved", "Command", "Commands", "ConfigError", "Event", "EventTail", "LogMessage",
    "MemorySample", "ModelLoadError", "PhaseChanged", "RunFinished", "RunInfo", "RunStarted", "SamplesSaved", "SpykeError",
    "StepCompleted", "TrainConfig", "build_config", "change_flags", "coerce_value", "default_runs_root", "detach_run",
    "export_kohya", "export_tensorboard", "field_is_optional", "field_type", "fields_in_group", "format_bytes",
    "import_kohya", "line_at", "list_runs", "make_parser", "notify_run_end", "overrides_from_namespace", "parse_flags",
    "parse_line",
    "parse_train_args", "pid_alive", "plan_run", "prepare_demo",
    "resolve_run", "resume_command", "run_headless", "send_command", "start_training", "step_loss", "step_losses", "to_toml",
    "type_token", "user_config_path", "ValidationLoss", "write_file",
]


def plan_run(config: TrainConfig) -> Any:
    """What a run of ``config`` will do (steps, epochs, checkpoints, disk): an ``engine.plan.RunPlan``."""
    from engine.plan import plan_run as plan

    return plan(config)


def prepare_demo(**overrides: Any) -> TrainConfig:
    """The built-in tiny model and a generated dataset (built once, cached); their config."""
    from engine.demo import prepare_demo as prepare

    return prepare(**overrides)


def start_training(config: TrainConfig, sinks: Iterable[Callable[[Event], None]] = ()) -> Any:
    """Run ``config`` on a daemon thread of this process; an ``engine.session.TrainingHandle``."""
    from engine.session import start_training as start

    return start(config, sinks)


def run_headless(config: TrainConfig) -> int:
    """Train without a screen, printing progress lines; the process exit code."""
    from engine.headless import run_headless as run

    return run(config)


def notify_run_end(status: str, step: int, error: str | None = None, *, run: str = "", out: Any = None) -> None:
    """Ring the terminal bell (``out`` a tty) and send a desktop notification that a run ended."""
    from engine.notify import notify_run_end as notify

    notify(status, step, error, run=run, out=out)


def import_kohya(text: str) -> tuple[str, list[str]]:
    """A kohya training command (as a shell file holds it) as a preset TOML, and the info lines of its flags."""
    from engine.cli_args import make_parser as parser_for, parse_train_args as parse
    from engine.kohya_command import command_to_argv

    notes: list[str] = []
    parser, argv = parser_for("import-kohya", "", config_positional=False), command_to_argv(text)
    if parse_flags(parser, argv).output_config:
        raise ConfigError("--output_config: import-kohya writes a preset (-o PRESET.toml), not kohya's config file; "
                          "drop --output_config from the command")
    _, config = parse(parser, argv, notes=notes)
    return to_toml(config, skip_defaults=True), notes


def export_kohya(config_path: str, notes: list[str] | None = None) -> str:
    """The ``accelerate launch … train_network.py …`` command that trains the preset (or kohya config file) at
    ``config_path``; a key there that is no kohya flag is left out with a line in ``notes``, as kohya ignores it."""
    from pathlib import Path

    from engine.kohya_command import export_command

    config = build_config(Path(config_path), kohya_file=True, notes=notes)
    ours = {name for name, f in FIELDS.items() if f.metadata.get("ours")}
    return export_command(config.to_dict(), ours)


def detach_run(config: TrainConfig, config_path: str | None = None) -> int:
    """Start a headless run in its own session, in the background; the exit code."""
    from engine.detach import detach_run as detach

    return detach(config, config_path)


def export_tensorboard(run: str, logging_dir: str | None = None) -> list[str]:
    """Write kohya's TensorBoard scalars for a run from its journal; the lines to show the user."""
    from engine.tensorboard_export import export_tensorboard as export

    return export(run, logging_dir)
