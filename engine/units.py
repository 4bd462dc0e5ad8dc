"""How sizes read on screen and in progress lines: one ``format_bytes`` (binary units: KiB, MiB, GiB)."""

from __future__ import annotations


def format_bytes(n: int | None) -> str:
    """``3.0 MiB``; ``–`` when unknown."""
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
