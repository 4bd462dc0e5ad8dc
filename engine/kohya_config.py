"""kohya's ``--config_file`` and the values of kohya flags that are not config fields.

sd-scripts' ``read_config_from_file``: the file name gets ``.toml`` when it has none; every table is
flattened into one set of keys (a key outside a table is kept as is); command-line flags override
the file; ``--output_config`` writes the given settings to the file (never over an existing one)
and exits. Values are typed by the flag, with what kohya's TOMLs carry: ``64.0`` for an integer,
``[5e-5, 5e-5]`` for ``text_encoder_lr`` (kohya's nargs="*"), ``""`` for an unset path.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError
from engine.kohya_flags import CONFIG_FILE_FLAGS, TABLE, decide
from engine.scalars import scalar_value


def config_file_path(value: str) -> Path:
    """kohya: ``--config_file=NAME`` reads ``NAME.toml`` when NAME does not end in .toml."""
    return Path(value if value.endswith(".toml") else value + ".toml")


def read_toml(path: Path, *, label: str | None = None, missing: str = "config file not found") -> dict[str, Any]:
    """A TOML file as a dict, or a one-line ConfigError starting with ``label`` (default: the path)."""
    label = label or str(path)
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{label}: {missing}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{label}: not valid TOML ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label}: cannot read ({err})") from None


def coerce_flag(name: str, raw: Any, where: str) -> Any:
    """A value of a table flag, typed by kohya's flag (None for an empty value)."""
    kind = TABLE[name].kind
    if raw is None or (isinstance(raw, str) and raw.strip() == "" and kind is not str):
        return [] if kind is list else None
    try:
        if kind is list:
            if isinstance(raw, str):
                return raw.split()
            if isinstance(raw, (list, tuple)):
                return [str(x) for x in raw]
            raise ValueError
        return scalar_value(kind, raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {kind.__name__} (got {raw!r})") from None


def one_float(name: str, raw: Any, where: str) -> Any:
    """kohya's ``text_encoder_lr`` is nargs="*" (one value per text encoder). SD1.x has one text encoder, and
    kohya's train_network.py takes the list's first value for it (an empty list: unset). Returns that float,
    None for an empty list, or ``raw`` when it is no list (see :func:`several_values_note`)."""
    if not isinstance(raw, (list, tuple)):
        return raw
    if not raw:
        return None
    try:
        values = [float(x) for x in raw]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be numbers (got {list(raw)!r})") from None
    return values[0]


def several_values_note(name: str, raw: Any, shown: str) -> str | None:
    """The info line for a text_encoder_lr list whose values differ: only the first one is used, as in kohya."""
    from engine.config import FIELDS

    if name not in FIELDS or FIELDS[name].metadata.get("kind") != "one_float" or not isinstance(raw, (list, tuple)):
        return None
    try:
        values = [float(x) for x in raw]
    except (TypeError, ValueError):
        return None
    if len(set(values)) < 2:
        return None
    return (f"{shown} {' '.join(str(x) for x in raw)}: SD1.x has one text encoder; kohya's train_network.py uses "
            f"the first value, {values[0]:g}, and so does spyke-cockpit")


def float_steps_note(name: str, raw: Any, shown: str) -> str | None:
    """The info line for ``lr_warmup_steps = 100.0`` in a --config_file: kohya's config reader keeps the TOML
    float and its scheduler takes any float as a ratio of the total steps (100.0 = a warm-up 100 times the run,
    never finished). spyke-cockpit reads a whole float of 1 or more as that many steps, and says so."""
    from engine.config import FIELDS

    if name not in FIELDS or FIELDS[name].metadata.get("kind") != "steps_or_ratio" or not isinstance(raw, float):
        return None
    if not (raw >= 1 and raw.is_integer()):
        return None
    return (f"{shown} = {raw!r}: read as {int(raw)} steps; kohya would take this float as a ratio of the total "
            f"steps ({raw:g} x the run's length); write {int(raw)} to mean steps")


def ignored_key_note(name: str, where: str, known: bool) -> str | None:
    """kohya's ``--config_file`` becomes an argparse Namespace: a key that is no flag stays in it unread. The
    warning line for such a key (None for a flag's key, which is read)."""
    if name in CONFIG_FILE_FLAGS:
        return f"{where}: {name} is ignored inside a config file (kohya reads it from the command line only)"
    if known:
        return None
    return (f"warning: {where}: {name!r} is not a train_network.py flag; ignored, as kohya ignores it "
            "(misspelt? see `spyke-cockpit train --help`)")


def apply_flags(extras: Mapping[str, tuple[Any, str]], given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Decide every table flag: ``extras`` maps name -> (typed value, where it came from).
    Returns the config fields they set and the info lines; raises the first refusal."""
    fields: dict[str, Any] = {}
    notes: list[str] = []
    for name, (value, where) in extras.items():
        note, sets = decide(name, value, given, where)
        fields.update(sets)
        if note:
            notes.append(note)
    return fields, notes


_NOT_WRITTEN = ("config_file", "output_config", "wandb_api_key")
# Fields whose kohya flag has no default (kohya needs it, or its dataset needs it): always written out, since
# the default here ("networks.lora", "output", "512") is not kohya's.
NO_KOHYA_DEFAULT = ("network_module", "output_dir", "resolution")


def at_kohya_default(name: str, value: Any) -> bool:
    """``name=value`` is what kohya's train_network.py does without the flag (a command or config file leaves
    it out, as kohya's ``--output_config`` does). For a config field: its default here, which is kohya's
    (``AdamW`` for kohya's ``""``, None for its 75 tokens), except :data:`NO_KOHYA_DEFAULT`; for a table flag:
    off, empty or the flag's kohya default."""
    from engine.config import FIELDS, field_default

    if name in FIELDS:
        return name not in NO_KOHYA_DEFAULT and value == field_default(name)
    if value is None or value is False or value == "" or value == []:
        return True
    return name in TABLE and TABLE[name].default is not None and value == TABLE[name].default


def output_config(path: Path, values: Mapping[str, Any]) -> None:
    """kohya's ``--output_config``: the given settings (not those at kohya's defaults) as TOML; refuses an
    existing file.
    As kohya, the file never holds the config-file flags themselves nor the wandb API key (a secret)."""
    import tomli_w

    if path.exists():
        raise ConfigError(f"{path}: config file already exists; --output_config never replaces a file "
                          "(choose another --config_file name)")
    doc = {k: v for k, v in values.items()
           if v is not None and k not in _NOT_WRITTEN and (k in NO_KOHYA_DEFAULT or not at_kohya_default(k, v))}
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(tomli_w.dumps(doc))
    except OSError as err:
        raise ConfigError(f"{path}: cannot write the config file ({err.strerror})") from None
