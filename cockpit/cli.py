"""The ``spyke-cockpit`` command.

    spyke-cockpit [CONFIG.toml] [kohya flags…] [--autostart]   the cockpit (form + live panels)
    spyke-cockpit demo [--headless] [--autostart] [flags…]      the built-in tiny model on a generated dataset
    spyke-cockpit train --headless [CONFIG.toml] [flags…]       train without the TUI
    spyke-cockpit attach [RUN] [--read-only]                    watch / steer a run from its run folder
    spyke-cockpit ls [FOLDER]                                   list runs
    spyke-cockpit serve [RUN] [--port 8000]                     attach in a web browser (127.0.0.1)
    spyke-cockpit compare RUN [--sheet OUT.png]                 choose a checkpoint: samples × prompts
    spyke-cockpit export-tensorboard RUN [--logging_dir DIR]    kohya's TensorBoard logs from a run's journal

Importing this module loads neither textual nor torch: each command imports what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from engine.errors import SpykeError

PROG = "spyke-cockpit"
COMMANDS = ("train", "demo", "attach", "ls", "serve", "compare", "export-tensorboard")


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return code


def cmd_train(argv: Sequence[str]) -> int:
    from engine.api import make_parser, parse_train_args

    parser = make_parser(f"{PROG} train", "Train a LoRA with kohya train_network.py flags.", extra=[
        (("--headless",), {"action": "store_true", "help": "train without the cockpit, printing progress lines"}),
        (("--detach",), {"action": "store_true", "help": "start a headless run in the background and return"}),
    ])
    ns, config = parse_train_args(parser, argv)
    if ns.detach:
        from engine.api import detach_run

        return detach_run(config, ns.config)
    if not ns.headless:
        return _run_tui(config, demo=False, autostart=True, config_path=ns.config)
    config.validate()
    from engine.api import run_headless

    return run_headless(config)


def cmd_demo(argv: Sequence[str]) -> int:
    from engine.api import make_parser, overrides_from_namespace

    parser = make_parser(f"{PROG} demo", "Train the built-in tiny SD1.5-shaped model on a generated dataset.",
                         config_positional=False, extra=[
                             (("--headless",), {"action": "store_true", "help": "train without the cockpit"}),
                             (("--autostart",), {"action": "store_true", "help": "start training at once"}),
                         ])
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        return _fail(f"unknown flag {unknown[0].split('=', 1)[0]} (see `{PROG} demo --help`)")
    overrides = overrides_from_namespace(ns)
    if ns.headless:
        from engine.api import prepare_demo, run_headless

        print("preparing the built-in tiny model and dataset…", flush=True)
        return run_headless(prepare_demo(**overrides).validate())
    return _run_tui(None, demo=True, autostart=ns.autostart, config_path=None, overrides=overrides)


def cmd_cockpit(argv: Sequence[str]) -> int:
    from engine.api import make_parser, parse_train_args

    parser = make_parser(PROG, __doc__.strip().splitlines()[0], extra=[
        (("--autostart",), {"action": "store_true", "help": "start training at once"}),
    ])
    ns, config = parse_train_args(parser, argv)
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


def cmd_export_tensorboard(argv: Sequence[str]) -> int:
    import argparse

    from engine.api import export_tensorboard

    parser = argparse.ArgumentParser(prog=f"{PROG} export-tensorboard",
                                     description="Write kohya's TensorBoard scalars for a run from its events.jsonl.")
    parser.add_argument("run", metavar="RUN_FOLDER", help="a run folder (<output_dir>/.spyke/<run id>) or a run id")
    parser.add_argument("--logging_dir", default=None, metavar="DIR",
                        help="where to write (default: the run's --logging_dir, else <output_dir>/logs)")
    ns = parser.parse_args(list(argv))
    for line in export_tensorboard(ns.run, ns.logging_dir):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__.strip())
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if command else argv
    handler = {"train": cmd_train, "demo": cmd_demo, "attach": cmd_attach, "ls": cmd_ls,
               "serve": cmd_serve, "compare": cmd_compare, "export-tensorboard": cmd_export_tensorboard}.get(command, cmd_cockpit)
    try:
        return handler(rest)
    except SpykeError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
