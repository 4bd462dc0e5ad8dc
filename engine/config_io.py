"""Reading and writing the run's configuration: TOML presets, CLI flags and form strings into typed
field values and a :class:`TrainConfig`, and a config back into a TOML document."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, Mapping

from engine.config import (FIELDS, GROUPS, TrainConfig, field_default, field_is_optional, field_item_type, field_type,
                           fields_in_group)
from engine.errors import ConfigError
from engine.scalars import scalar_value


def parse_resolution(value: Any, where: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768,512' or [768, 512] -> (768, 512)."""
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(str(p).strip()) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 64:
        raise ConfigError(f"{where}: must be 'N' or 'W,H' with sides ≥ 64 (got {value!r})")
    return nums[0], nums[1]


def coerce_value(name: str, raw: Any, where: str) -> Any:
    """Convert a TOML value or a CLI/form string into the field's type, or raise a one-line ConfigError.
    A kohya flag that is no field (engine.kohya_flags.TABLE) is typed by its kohya type."""
    if name not in FIELDS:
        from engine.kohya_flags import TABLE

        if name in TABLE:
            from engine.kohya_config import coerce_flag

            return coerce_flag(name, raw, where)
        raise ConfigError(f"{where}: unknown option {name!r}; see `spyke-cockpit train --help` for the flags")
    kind = field_type(name)
    if FIELDS[name].metadata.get("kind") == "one_float":
        from engine.kohya_config import one_float

        raw = one_float(name, raw, where)
    if kind is list:
        return _coerce_list(name, raw, where)
    blank = isinstance(raw, str) and raw.strip() == ""
    if blank and FIELDS[name].metadata.get("choices"):
        return None if field_is_optional(name) else field_default(name)  # kohya's GUI writes "" for "not chosen"
    if raw is None or (blank and kind is not str):
        if field_is_optional(name):
            return None
        raise ConfigError(f"{where}: {name} needs a value")
    if name == "resolution" and not isinstance(raw, str):
        w, h = parse_resolution(raw, where)
        return f"{w},{h}" if w != h else str(w)
    if FIELDS[name].metadata.get("kind") == "steps_or_ratio" and isinstance(raw, str) and raw.strip().endswith("%"):
        return _percent(name, raw, where)
    try:
        value = scalar_value(kind, raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {kind.__name__} (got {raw!r})") from None
    if kind is float and FIELDS[name].metadata.get("kind") == "steps_or_ratio":
        return _steps_or_ratio(name, value, where)
    if name == "max_token_length" and value == 75:
        return None  # kohya's default: 75 tokens (its argparse refuses 75, its config files carry it)
    return value


def is_dataset_toml(data: Mapping[str, Any]) -> bool:
    """A kohya dataset config: a ``[[datasets]]`` array of tables, or a ``[general]`` table holding
    keys only a dataset config has (``batch_size``, ``num_repeats``, ``image_dir``…)."""
    from engine.dataset_config import DATASET_ASCENDABLE, SUBSET_ASCENDABLE, SUBSET_ONLY

    datasets = data.get("datasets")
    if isinstance(datasets, list) and all(isinstance(d, dict) for d in datasets):
        return True
    general = data.get("general")
    dataset_only = (set(DATASET_ASCENDABLE) | set(SUBSET_ASCENDABLE) | set(SUBSET_ONLY)) - set(FIELDS)
    return isinstance(general, dict) and any(key in dataset_only for key in general)


def _coerce_list(name: str, raw: Any, where: str) -> list:
    """A TOML list, a CLI value list, or one space-separated string (the form; some TOMLs); a lone TOML value
    is a list of one. ``list[float]`` fields (kohya's ``type=float, nargs="*"``) get numbers; ``""`` or
    ``[]`` is the empty list (unset)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            items: list = shlex.split(raw)
        except ValueError as err:
            raise ConfigError(f"{where}: {name}: {err} in {raw!r}") from None
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        items = [raw]
    if field_item_type(name) is float:
        return [_number_item(name, x, where) for x in items]
    if isinstance(raw, (str, list, tuple)) and all(isinstance(x, str) for x in items):
        return [str(x) for x in items]
    if FIELDS[name].metadata.get("kind") == "paths":
        raise ConfigError(f"{where}: {name} must be file paths, e.g. [\"a.safetensors\"] (got {raw!r})")
    raise ConfigError(f"{where}: {name} must be key=value strings, e.g. [\"weight_decay=0.01\"] (got {raw!r})")


def _number_item(name: str, value: Any, where: str) -> float:
    """One number of a ``list[float]`` field, or the one-line error naming it."""
    shown = where if where in (f"--{name}", name) else f"{where}: {name}"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) and not (isinstance(value, str) and value.strip().lower() == "nan"):
        raise ConfigError(f"{shown}: {value!r} is not a number")
    if not math.isfinite(number):
        raise ConfigError(f"{shown}: {value!r} is not a finite number")
    return number


def _steps_or_ratio(name: str, value: float, where: str) -> float | int:
    """kohya's int_or_float: below 1 a ratio of the total steps (a float), else a whole number of steps (an int)."""
    if math.isfinite(value) and value >= 1:
        if not value.is_integer():
            raise ConfigError(f"{where}: {name} must be a whole number of steps, or a ratio below 1 (got {value!r})")
        return int(value)
    return int(value) if value == 0 else value


def _percent(name: str, raw: str, where: str) -> float | int:
    """kohya's int_or_float also takes a percentage of the total steps: ``10%`` is the ratio 0.1."""
    try:
        ratio = float(raw.strip()[:-1]) / 100.0
    except ValueError:
        raise ConfigError(f"{where}: {name} must be steps, a ratio below 1 or a percentage (got {raw!r})") from None
    if not 0 <= ratio < 1:
        raise ConfigError(f"{where}: {name} as a percentage must be from 0% to below 100% of the steps (got {raw!r})")
    return 0 if ratio == 0 else ratio


def load_toml_values(path: Path, *, kohya_file: bool = False, notes: list[str] | None = None) -> dict[str, Any]:
    """Read a preset TOML: keys at top level or in any tables (kohya's config_file style), typed; kohya flags
    that are no config field are kept too (see :func:`build_config`). A key that is neither is refused, except
    in kohya's ``--config_file`` (``kohya_file``): kohya's argparse Namespace keeps it unread, so it is ignored
    with one line in ``notes``. Info lines about values (several text_encoder_lr) go to ``notes`` too."""
    from engine.kohya_config import float_steps_note, ignored_key_note, read_toml, several_values_note
    from engine.kohya_flags import TABLE

    data = read_toml(Path(path))
    if is_dataset_toml(data):
        raise ConfigError(f"{path}: this is a kohya dataset config; pass it as --dataset_config={path} "
                          "(the positional argument is a training preset)")
    lines: list[str] = []
    flat: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path} [{key}]" if isinstance(value, dict) else str(path)
        for sub, subvalue in (value.items() if isinstance(value, dict) else [(key, value)]):
            if kohya_file and (note := ignored_key_note(sub, where, sub in FIELDS or sub in TABLE)):
                lines.append(note)
                continue
            flat[sub] = coerce_value(sub, subvalue, where)
            if note := several_values_note(sub, subvalue, f"{where}: {sub}"):
                lines.append(note)
            if kohya_file and (note := float_steps_note(sub, subvalue, f"{where}: {sub}")):
                lines.append(note)
    if notes is not None:
        notes.extend(lines)
    return flat


def build_config(toml_path: Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                 notes: list[str] | None = None, kohya_file: bool = False) -> TrainConfig:
    """Defaults, then the TOML (``kohya_file``: read as kohya's ``--config_file``), then ``overrides``
    (already-typed values, e.g. from the CLI).

    kohya flags that are no field are decided by engine.kohya_flags: their info lines are appended to
    ``notes``; one spyke-cockpit cannot honour raises a one-line ConfigError naming it."""
    from engine.kohya_config import apply_flags

    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    lines: list[str] = []
    if toml_path is not None:
        loaded = load_toml_values(Path(toml_path), kohya_file=kohya_file, notes=lines)
        values.update(loaded)
        where.update({k: str(toml_path) for k in loaded})
    if overrides:
        values.update(overrides)
        where.update({k: f"--{k}" for k in overrides})
    extras = {k: (v, where.get(k, f"--{k}")) for k, v in values.items() if k not in FIELDS}
    fields_set, flag_lines = apply_flags(extras, values)
    lines.extend(flag_lines)
    chosen = {k: v for k, v in values.items() if k in FIELDS}
    for key, value in fields_set.items():
        chosen.setdefault(key, value)
    if notes is not None:
        notes.extend(lines)
    return TrainConfig(**chosen)


def to_toml(config: TrainConfig, *, skip_defaults: bool = False) -> str:
    """The config as a grouped TOML document (None values are left out)."""
    import tomli_w

    doc: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        table = {}
        for f in fields_in_group(group):
            value = getattr(config, f.name)
            if value is None or (skip_defaults and value == field_default(f.name)):
                continue
            table[f.name] = value
        if table:
            doc[group] = table
    return tomli_w.dumps(doc)
