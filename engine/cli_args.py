"""kohya-style command-line flags, generated from the config model (no torch)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from engine.config import FIELDS, GROUPS, TrainConfig, field_default, field_item_type, field_type, fields_in_group
from engine.config_io import build_config, coerce_value
from engine.errors import ConfigError
from engine.kohya_config import config_file_path, output_config, several_values_note
from engine.kohya_flags import EXTRA_GROUPS, GUI_ONLY, INFO, REFUSED, TABLE

_STATUS = {INFO: "accepted, no effect on the weights", REFUSED: "not supported"}


_SWITCH_VALUE = re.compile(r"argument (--\w+): ignored explicit argument (.*)$")
_AMBIGUOUS = re.compile(r"ambiguous option: (--\w+)\S* could match (.*)$")
_NO_VALUE = re.compile(r"argument (--\w+)(?:/[^:]*)?: expected (?:one|at least one) argument$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag, no usage dump
        if found := _SWITCH_VALUE.match(message):
            raise ConfigError(_switch_value(found.group(1), found.group(2).strip("'\"")))
        if found := _AMBIGUOUS.match(message):
            raise ConfigError(f"{found.group(1)} is the start of several flags ({found.group(2)}); write the whole "
                              "flag")
        if found := _NO_VALUE.match(message):
            flag = found.group(1)
            raise ConfigError(f"{flag} needs a value: {flag}=VALUE (quote it when it starts with '-': "
                              f"{flag}=\"-…\")")
        raise ConfigError(f"{self.prog}: {message}")


_METAVAR = {int: "N", float: "X", str: "TEXT"}
_HELP_COLUMN = 42


class _OneLineHelp(argparse.HelpFormatter):
    """``--help`` with one line per flag: the flag and its value, then its help, never wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=_HELP_COLUMN, width=1 << 20)

    def _format_action(self, action: argparse.Action) -> str:
        invocation = self._format_action_invocation(action)
        text = " ".join(self._expand_help(action).split()) if action.help else ""
        return f"  {invocation:<{_HELP_COLUMN - 4}}  {text}".rstrip() + "\n"


def _switch_value(flag: str, value: str) -> str:
    return (f"{flag} is a switch and takes no value (got {value!r}): write {flag} alone to turn it on, "
            "or leave it out to keep it off")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` per config field, in kohya spelling; values stay None unless given."""
    groups = {}
    for group_key, title in {**GROUPS, **EXTRA_GROUPS}.items():
        groups[group_key] = group = parser.add_argument_group(title)
        for f in fields_in_group(group_key) if group_key in GROUPS else ():
            default = field_default(f.name)
            shown = default is not False and default not in (None, "", [])
            help_text = f.metadata["help"] + (f" (default: {default})" if shown else "")
            if field_type(f.name) is bool:
                group.add_argument(f"--{f.name}", action="store_true", default=None, help=help_text)
            elif field_type(f.name) is list:  # kohya's nargs="*": --optimizer_args a=1 b=2
                metavar = ("PATH" if f.metadata.get("kind") == "paths" else
                           "X" if field_item_type(f.name) is float else "KEY=VALUE")
                group.add_argument(f"--{f.name}", nargs="*", default=None, metavar=metavar, help=help_text)
            elif f.metadata.get("kind") == "one_float":  # kohya's nargs="*" of numbers
                group.add_argument(f"--{f.name}", nargs="*", default=None, metavar="LR", help=help_text)
            else:
                choices = f.metadata.get("choices")
                metavar = "PATH" if f.metadata.get("kind") == "path" else _METAVAR[field_type(f.name)]
                group.add_argument(f"--{f.name}", default=None, metavar=metavar, help=help_text
                                   + (f" [{'|'.join(choices)}]" if choices else ""))
    groups["other"].add_argument("--config_file", default=None, metavar="FILE.toml",
                                 help="kohya's config file: every table flattened; flags given here override it")
    groups["other"].add_argument("--output_config", action="store_true", default=None,
                                 help="write the given settings to --config_file (a new file) and exit, as kohya")
    for flag in TABLE.values():
        if flag.name in FIELDS:
            continue
        help_text = _table_help(flag)
        kwargs = ({"action": "store_true"} if flag.kind is bool else {"nargs": "*"} if flag.kind is list else
                  {"metavar": _METAVAR[flag.kind]})
        groups[flag.group].add_argument(f"--{flag.name}", default=None, help=help_text, **kwargs)


def _table_help(flag: Any) -> str:
    """The help line of a kohya flag that is no config field: what it does here, or why it is refused."""
    if flag.name in GUI_ONLY:
        return f"config files only: {flag.line}; refused on the command line"
    if flag.status == INFO:
        return flag.line or _STATUS[INFO]
    if flag.status == REFUSED:
        return flag.line if _STATUS[REFUSED] in flag.line else f"{_STATUS[REFUSED]}: {flag.line}".rstrip(": ")
    return f"kohya spelling of --{flag.target}"


def make_parser(prog: str, description: str, *, config_positional: bool = True,
                extra: Sequence[tuple[Sequence[str], dict]] = ()) -> argparse.ArgumentParser:
    usage = f"%(prog)s{' [CONFIG.toml]' if config_positional else ''} [--flag VALUE | --flag=VALUE | --switch] ..."
    # allow_abbrev as kohya's parser has it: a unique prefix of a flag is that flag (--max_train_epoch=4)
    parser = _Parser(prog=prog, description=description, allow_abbrev=True, usage=usage, formatter_class=_OneLineHelp)
    if config_positional:
        parser.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml",
                            help="a preset TOML (flags given on the command line override it)")
    for names, kwargs in extra:
        parser.add_argument(*names, **kwargs)
    add_config_flags(parser)
    return parser


def overrides_from_namespace(ns: argparse.Namespace, notes: list[str] | None = None) -> dict[str, Any]:
    """The flags given, typed (info lines about their values, e.g. several text_encoder_lr, go to ``notes``)."""
    out = {}
    for name in list(FIELDS) + [n for n in TABLE if n not in FIELDS]:
        raw = getattr(ns, name, None)
        if raw is not None:
            out[name] = coerce_value(name, raw, f"--{name}")
            if notes is not None and (note := several_values_note(name, raw, f"--{name}")):
                notes.append(note)
    return out


def _stray_value(parser: argparse.ArgumentParser, argv: Sequence[str], value: str) -> str:
    """The message for a word no flag takes, naming the flag before it."""
    one_value = {o for a in parser._actions if a.nargs is None for o in a.option_strings}
    switches = {o for a in parser._actions if a.nargs == 0 for o in a.option_strings}
    args = list(argv)
    # the first place the word stands that is not the value of the one-value flag before it
    at = next((i for i, a in enumerate(args) if a == value and not (i and args[i - 1] in one_value)), -1)
    before = next((a.split("=", 1)[0] for a in reversed(args[:at]) if a.startswith("--")), None) if at > 0 else None
    if before is None:
        return f"{value}: expected a .toml preset as the first argument"
    if before in switches and args[at - 1] == before:
        return _switch_value(before, value)
    several = {o for a in parser._actions if a.nargs == "*" for o in a.option_strings}
    if before in several and args[at - 1].startswith(f"{before}="):
        return (f"{before}: written with '=' it takes one value, but {value!r} follows it; for several values put "
                f"a space after the flag ({before} a b …), as in kohya")
    return (f"{before}: takes one value, but {value!r} follows it; quote a value with spaces "
            f"({before}=\"…\")")


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """argparse as kohya's, but an unknown flag or a stray word is one ConfigError line naming the flag."""
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=", 1)[0]
        if flag.startswith("-"):
            raise ConfigError(f"unknown flag {flag}: not a kohya train_network.py flag that spyke-cockpit supports "
                              f"(see `{parser.prog} --help`)")
        raise ConfigError(_stray_value(parser, argv, flag))
    return ns


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str], *,
                     notes: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Parse flags and build the config: defaults < CONFIG.toml or --config_file < flags.

    Unknown flags are a ConfigError naming the flag. The info lines for accepted kohya flags are
    appended to ``notes``, or printed to stderr when ``notes`` is None. ``--output_config`` writes
    the file and exits (status 0), as kohya does."""
    ns = parse_flags(parser, argv)
    toml_path = Path(ns.config) if getattr(ns, "config", None) else None
    if toml_path is not None and toml_path.suffix.lower() != ".toml":
        raise ConfigError(_stray_value(parser, argv, ns.config))
    config_file = getattr(ns, "config_file", None)
    lines: list[str] = []
    overrides = overrides_from_namespace(ns, lines)
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
    config = build_config(toml_path, overrides, notes=lines, kohya_file=bool(config_file))
    if notes is not None:
        notes.extend(lines)
    else:
        prog = parser.prog.split()[0]
        for line in lines:
            sys.stderr.write(f"{prog}: {line}\n")
    return ns, config
