"""kohya-style command-line flags, generated from the config model (no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from engine.config import (FIELDS, GROUPS, TrainConfig, build_config, coerce_value, field_default, field_type,
                           fields_in_group)
from engine.errors import ConfigError
from engine.kohya_config import config_file_path, output_config
from engine.kohya_flags import EXTRA_GROUPS, INFO, PENDING, REFUSED, TABLE

_STATUS = {INFO: "accepted, no effect on the weights", REFUSED: "not supported", PENDING: "not supported yet"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(f"{self.prog}: {message}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` per config field, in kohya spelling; values stay None unless given."""
    groups = {}
    for group_key, title in {**GROUPS, **EXTRA_GROUPS}.items():
        groups[group_key] = group = parser.add_argument_group(title)
        for f in fields_in_group(group_key) if group_key in GROUPS else ():
            default = field_default(f.name)
            help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, "", []) else "")
            if field_type(f.name) is bool:
                group.add_argument(f"--{f.name}", action="store_true", default=None, help=help_text)
            elif field_type(f.name) is list:  # kohya's nargs="*": --optimizer_args a=1 b=2
                group.add_argument(f"--{f.name}", nargs="*", default=None, metavar="KEY=VALUE", help=help_text)
            elif f.metadata.get("kind") == "one_float":  # kohya's nargs="*" of numbers
                group.add_argument(f"--{f.name}", nargs="*", default=None, metavar="LR", help=help_text)
            else:
                choices = f.metadata.get("choices")
                group.add_argument(f"--{f.name}", default=None, metavar=f.name.upper(), help=help_text
                                   + (f" [{'|'.join(choices)}]" if choices else ""))
    groups["other"].add_argument("--config_file", default=None, metavar="FILE.toml",
                                 help="kohya's config file: every table flattened; flags given here override it")
    groups["other"].add_argument("--output_config", action="store_true", default=None,
                                 help="write the given settings to --config_file (a new file) and exit, as kohya")
    for flag in TABLE.values():
        if flag.name in FIELDS:
            continue
        help_text = (flag.line or _STATUS.get(flag.status, "")) if flag.status == INFO else _STATUS.get(
            flag.status, f"kohya spelling of --{flag.target}")
        kwargs = ({"action": "store_true"} if flag.kind is bool else {"nargs": "*"} if flag.kind is list else
                  {"metavar": flag.name.upper()})
        groups[flag.group].add_argument(f"--{flag.name}", default=None, help=help_text, **kwargs)


def make_parser(prog: str, description: str, *, config_positional: bool = True,
                extra: Sequence[tuple[Sequence[str], dict]] = ()) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    if config_positional:
        parser.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml",
                            help="a preset TOML (flags given on the command line override it)")
    for names, kwargs in extra:
        parser.add_argument(*names, **kwargs)
    add_config_flags(parser)
    return parser


def overrides_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in list(FIELDS) + [n for n in TABLE if n not in FIELDS]:
        raw = getattr(ns, name, None)
        if raw is not None:
            out[name] = coerce_value(name, raw, f"--{name}")
    return out


def _stray_value(argv: Sequence[str], value: str) -> str:
    """The message for a value no flag takes, naming the flag before it."""
    args = list(argv)
    at = args.index(value) if value in args else -1
    before = next((a.split("=", 1)[0] for a in reversed(args[:at]) if a.startswith("--")), None) if at > 0 else None
    if before is None:
        return f"{value}: expected a .toml preset as the first argument"
    return (f"{before}: takes one value, but {value!r} follows it; quote a value with spaces "
            f"({before}=\"…\")")


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str], *,
                     notes: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Parse flags and build the config: defaults < CONFIG.toml or --config_file < flags.

    Unknown flags are a ConfigError naming the flag. The info lines for accepted kohya flags are
    appended to ``notes``, or printed to stderr when ``notes`` is None. ``--output_config`` writes
    the file and exits (status 0), as kohya does."""
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=", 1)[0]
        if flag.startswith("-"):
            raise ConfigError(f"unknown flag {flag}: not a kohya train_network.py flag that spyke-cockpit supports "
                              f"(see `{parser.prog} --help`)")
        raise ConfigError(_stray_value(argv, flag))
    toml_path = Path(ns.config) if getattr(ns, "config", None) else None
    if toml_path is not None and toml_path.suffix.lower() != ".toml":
        raise ConfigError(_stray_value(argv, ns.config))
    config_file = getattr(ns, "config_file", None)
    overrides = overrides_from_namespace(ns)
    if config_file:
        if toml_path is not None:
            raise ConfigError(f"give the settings either as {toml_path} or as --config_file={config_file}, not both")
        toml_path = config_file_path(config_file)
        if getattr(ns, "output_config", None):
            output_config(toml_path, overrides)
            sys.stdout.write(f"saved the config file {toml_path}\n")
            raise SystemExit(0)
    elif getattr(ns, "output_config", None):
        raise ConfigError("--output_config needs --config_file=<the new FILE.toml to write>")
    lines: list[str] = []
    config = build_config(toml_path, overrides, notes=lines)
    if notes is not None:
        notes.extend(lines)
    else:
        prog = parser.prog.split()[0]
        for line in lines:
            sys.stderr.write(f"{prog}: {line}\n")
    return ns, config
