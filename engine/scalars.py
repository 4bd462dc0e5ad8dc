"""One scalar coercion for every place a setting is typed: the config model and kohya's flag table."""

from __future__ import annotations

from typing import Any


def scalar_value(kind: type, raw: Any) -> Any:
    """``raw`` (a TOML value, or text from the command line or the form) as a bool, int, float or str;
    ValueError/TypeError when it is not one (``1.5`` for an int, ``"maybe"`` for a bool, a table…)."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw) if not isinstance(raw, str) else int(raw.strip())
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    if isinstance(raw, (dict, list)):
        raise ValueError(raw)
    return str(raw)
