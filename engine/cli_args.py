"""kohya-style command-line flags, generated from the config model (no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from engine.config import (FIELDS, GROUPS, TrainConfig, build_config, coerce_value, field_default, field_type,
                           fields_in_group)
from engine.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(f"{self.prog}: {message}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` per config field, in kohya spelling; values stay None unless given."""
    for group_key, title in GROUPS.items():
        group = parser.add_argument_group(title)
        for f in fields_in_group(group_key):
            default = field_default(f.name)
            help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, "", []) else "")
            if field_type(f.name) is bool:
                group.add_argument(f"--{f.name}", action="store_true", default=None, help=help_text)
            elif field_type(f.name) is list:  # kohya's nargs="*": --optimizer_args a=1 b=2
                group.add_argument(f"--{f.name}", nargs="*", default=None, metavar="KEY=VALUE", help=help_text)
            else:
                choices = f.metadata.get("choices")
                group.add_argument(f"--{f.name}", default=None, metavar=f.name.upper(), help=help_text
                                   + (f" [{'|'.join(choices)}]" if choices else ""))


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
    for name in FIELDS:
        raw = getattr(ns, name, None)
        if raw is not None:
            out[name] = coerce_value(name, raw, f"--{name}")
    return out


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, TrainConfig]:
    """Parse flags and build the config: defaults < CONFIG.toml < flags. Unknown flags are a ConfigError."""
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        raise ConfigError(f"unknown flag {flag}: not a kohya train_network.py flag that spyke-cockpit supports "
                          f"(see `{parser.prog} --help`)")
    toml_path = Path(ns.config) if getattr(ns, "config", None) else None
    if toml_path is not None and toml_path.suffix.lower() != ".toml":
        raise ConfigError(f"{toml_path}: expected a .toml preset as the first argument")
    return ns, build_config(toml_path, overrides_from_namespace(ns))
