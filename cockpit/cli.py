"""The ``spyke-cockpit`` command: picks the subcommand; ``spyke-cockpit --help`` prints :data:`OVERVIEW`.

Importing this module loads neither textual nor torch: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from cockpit.pace import VIEW_INTERVAL
from engine.errors import SpykeError

PROG = "spyke-cockpit"
COMMANDS = ("train", "demo", "attach", "ls", "serve", "compare", "import-kohya", "export-kohya",
            "export-tensorboard")
README = Path(__file__).resolve().parent.parent / "README.md"
SUMMARY = "Train Stable Diffusion 1.5 LoRAs with kohya train_network.py flags, and watch the run in a terminal."

OVERVIEW = f"""\
usage: spyke-cockpit [COMMAND] [ARGS...]

{SUMMARY}

commands:
  spyke-cockpit [CONFIG.toml] [flags]        the cockpit: the settings form, then the live panels
  spyke-cockpit train [CONFIG.toml] [flags]  train with kohya flags (add --headless or --detach)
  spyke-cockpit demo [flags]                 the built-in tiny model on a generated dataset
  spyke-cockpit attach [RUN]                 watch and steer a run from any terminal
  spyke-cockpit ls [FOLDER]                  list runs: live, paused, finished, failed, stale
  spyke-cockpit serve [RUN]                  the attach view in a web browser (127.0.0.1 only)
  spyke-cockpit compare RUN [--sheet OUT]    choose a checkpoint: samples × prompts (or a PNG sheet)
  spyke-cockpit import-kohya FILE|-          a kohya train_network.py command (shell text) as a preset TOML
  spyke-cockpit export-kohya CONFIG          the accelerate launch train_network.py command for a preset
  spyke-cockpit export-tensorboard RUN       kohya's TensorBoard logs from a run's journal

everyday flags:
  --headless         train, demo: no screen; one line per step and per checkpoint
  --detach           train, demo: headless in the background (survives logout); prints how to attach
  --no_notify        train, demo: no bell or desktop notification when a run ends unwatched
  --autostart        the cockpit, demo: start training at once
  --root DIR         attach, ls, serve: where to look for runs (default: $SPYKE_RUNS_ROOT, else
                     runs_root in ~/.config/spyke-cockpit/config.toml, else the current folder)
  --read-only        attach, serve: watch only; pause, save and abort are refused
  --refresh SECONDS  attach: seconds between redraws (default {VIEW_INTERVAL:g})
  --port PORT        serve: the port to listen on, on 127.0.0.1 (default 8000)

more: `spyke-cockpit COMMAND --help` shows a command's flags (`train --help`: every kohya flag);
the README: {README if README.is_file() else "README.md in the spyke-cockpit source folder"}"""


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return code


DETACH_FLAG = (("--detach",), {"action": "store_true",
                               "help": "start a headless run in the background and return (prints how to attach)"})


def train_parser() -> argparse.ArgumentParser:
    from engine.api import make_parser

    return make_parser(f"{PROG} train", "Train a LoRA with kohya train_network.py flags.", extra=[
        (("--headless",), {"action": "store_true", "help": "train without the cockpit, printing progress lines"}),
        DETACH_FLAG,
    ])


def demo_parser() -> argparse.ArgumentParser:
    from engine.api import make_parser

    return make_parser(f"{PROG} demo", "Train the built-in tiny SD1.5-shaped model on a generated dataset.",
                       config_positional=False, extra=[
                           (("--headless",), {"action": "store_true", "help": "train without the cockpit"}),
                           DETACH_FLAG,
                           (("--autostart",), {"action": "store_true", "help": "start training at once"}),
                       ])


def cockpit_parser() -> argparse.ArgumentParser:
    from engine.api import make_parser

    return make_parser(PROG, SUMMARY, extra=[
        (("--autostart",), {"action": "store_true", "help": "start training at once"}),
    ])


def parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Every command's argparse parser (by command name; "" is the bare cockpit), for --help and tests."""
    from cockpit.attach import build_parser as attach_parser
    from cockpit.compare_run import build_parser as compare_parser
    from cockpit.ls import build_parser as ls_parser
    from cockpit.serve import build_parser as serve_parser

    return {"": cockpit_parser, "train": train_parser, "demo": demo_parser, "attach": attach_parser,
            "ls": ls_parser, "serve": serve_parser, "compare": compare_parser, "import-kohya": import_kohya_parser,
            "export-kohya": export_kohya_parser, "export-tensorboard": export_tensorboard_parser}


def cmd_train(argv: Sequence[str]) -> int:
    from engine.api import parse_train_args

    ns, config = parse_train_args(train_parser(), argv)
    if ns.detach:
        from engine.api import detach_run

        return detach_run(config, ns.config)
    if not ns.headless:
        return _run_tui(config, demo=False, autostart=True, config_path=ns.config)
    config.validate()
    from engine.api import run_headless

    return run_headless(config)


def cmd_demo(argv: Sequence[str]) -> int:
    from engine.api import overrides_from_namespace, parse_flags

    ns = parse_flags(demo_parser(), argv)
    overrides = overrides_from_namespace(ns)
    if ns.headless or ns.detach:
        from engine.api import detach_run, prepare_demo, run_headless

        print("preparing the built-in tiny model and dataset…", flush=True)
        config = prepare_demo(**overrides).validate()
        return detach_run(config) if ns.detach else run_headless(config)
    return _run_tui(None, demo=True, autostart=ns.autostart, config_path=None, overrides=overrides)


def cmd_cockpit(argv: Sequence[str]) -> int:
    from engine.api import parse_train_args

    ns, config = parse_train_args(cockpit_parser(), argv)
    given = bool(ns.config) or any(a.startswith("--") and a != "--autostart" for a in argv)
    return _run_tui(config if given else None, demo=False, autostart=ns.autostart,
                    config_path=Path(ns.config) if ns.config else None)


def _run_tui(config, *, demo: bool, autostart: bool, config_path, overrides=None) -> int:
    from cockpit.app import run_cockpit

    kwargs = {"demo": demo, "autostart": autostart, "config_path": Path(config_path) if config_path else None}
    if overrides:
        kwargs["overrides"] = overrides
    return run_cockpit(config, **kwargs)


def cmd_attach(argv: Sequence[str]) -> int:
    from cockpit.attach import main as attach_main

    return attach_main(argv)


def cmd_ls(argv: Sequence[str]) -> int:
    from cockpit.ls import main as ls_main

    return ls_main(argv)


def cmd_serve(argv: Sequence[str]) -> int:
    from cockpit.serve import main as serve_main

    return serve_main(argv)


def cmd_compare(argv: Sequence[str]) -> int:
    from cockpit.compare_run import main as compare_main

    return compare_main(argv)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the caller prints it), not a usage dump."""

    def error(self, message: str):
        from engine.errors import ConfigError

        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def import_kohya_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=f"{PROG} import-kohya", description="A kohya train_network.py command "
                                     "(a shell file, or - for stdin) as a spyke-cockpit preset TOML.")
    parser.add_argument("source", metavar="FILE|-", help="the shell file holding the command, or - for stdin")
    parser.add_argument("-o", "--output", metavar="PRESET.toml", help="write here (never over an existing file)")
    return parser


def export_kohya_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=f"{PROG} export-kohya", description="Print the accelerate launch "
                                     "train_network.py command that trains a preset.")
    parser.add_argument("config", metavar="CONFIG.toml", help="the preset (or a run folder's config.toml)")
    return parser


def cmd_import_kohya(argv: Sequence[str]) -> int:
    from engine.api import import_kohya

    ns = import_kohya_parser().parse_args(list(argv))
    if ns.source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(ns.source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            return _fail(f"{ns.source}: cannot read ({getattr(err, 'strerror', None) or err})")
    toml_text, notes = import_kohya(text)
    for note in notes:
        sys.stderr.write(f"{PROG}: {note}\n")
    if not ns.output:
        sys.stdout.write(toml_text)
        return 0
    try:
        with open(ns.output, "x", encoding="utf-8") as f:
            f.write(toml_text)
    except FileExistsError:
        return _fail(f"{ns.output}: already exists; import-kohya never replaces a file (choose another -o name)")
    except OSError as err:
        return _fail(f"{ns.output}: cannot write ({err.strerror})")
    print(f"wrote {ns.output}")
    return 0


def cmd_export_kohya(argv: Sequence[str]) -> int:
    ns = export_kohya_parser().parse_args(list(argv))
    from engine.api import export_kohya

    notes: list[str] = []
    command = export_kohya(ns.config, notes)
    for note in notes:
        sys.stderr.write(f"{PROG}: {note}\n")
    sys.stdout.write(command)
    return 0


def export_tensorboard_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} export-tensorboard",
                                     description="Write kohya's TensorBoard scalars for a run from its events.jsonl.")
    parser.add_argument("run", metavar="RUN_FOLDER", help="a run folder (<output_dir>/.spyke/<run id>) or a run id")
    parser.add_argument("--logging_dir", default=None, metavar="DIR",
                        help="where to write (default: the run's --logging_dir, else <output_dir>/logs)")
    return parser


def cmd_export_tensorboard(argv: Sequence[str]) -> int:
    from engine.api import export_tensorboard

    ns = export_tensorboard_parser().parse_args(list(argv))
    for line in export_tensorboard(ns.run, ns.logging_dir):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(OVERVIEW)
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if command else argv
    handler = {"train": cmd_train, "demo": cmd_demo, "attach": cmd_attach, "ls": cmd_ls,
               "serve": cmd_serve, "compare": cmd_compare, "import-kohya": cmd_import_kohya,
               "export-kohya": cmd_export_kohya, "export-tensorboard": cmd_export_tensorboard}.get(command, cmd_cockpit)
    try:
        return handler(rest)
    except SpykeError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
