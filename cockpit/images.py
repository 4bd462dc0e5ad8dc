"""Images in the terminal: real pixels where the terminal draws them, half-block colour cells elsewhere.

Three ways to draw a picture, chosen once per process by :func:`graphics_mode` before Textual takes
the terminal:

``kitty``      the kitty graphics protocol (kitty, and terminals that answer its query),
``sixel``      sixel graphics (xterm -ti vt340, foot, WezTerm, konsole, iTerm2, Windows Terminal…),
``halfblock``  one ``▀`` per two pixels, foreground = upper pixel, background = lower: works in any
               true-colour terminal, in tmux and over plain SSH, in ``serve`` and under Pilot.

Real pixels come from ``textual-image``, whose import asks the terminal what it supports (escape
queries answered on stdin, up to 0.1 s each when the terminal stays silent). It is imported only when
that question is worth asking: a terminal on stdout, not tmux/screen (which swallow the queries
unless passthrough is configured), and ``SPYKE_IMAGES`` not set to ``halfblock``. ``SPYKE_IMAGES`` =
``kitty`` / ``sixel`` / ``halfblock`` forces a mode.

Half-blocks are drawn here (Pillow), once per (file, size), then served from a cache: a
redraw of a thumbnail costs a dictionary look-up.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

MODES = ("kitty", "sixel", "halfblock")
ENV = "SPYKE_IMAGES"
CACHE_SIZE = 256               # thumbnails kept (a 24×12 one is ~300 segments)
_mode: str | None = None


def detect_mode(env: Mapping[str, str], stdout_is_tty: bool) -> str | None:
    """The mode the environment alone decides, or None when only asking the terminal can tell."""
    forced = env.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    if not stdout_is_tty:                      # Pilot, `serve`, a pipe
        return "halfblock"
    term = env.get("TERM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return "halfblock"
    if term in ("dumb", "linux"):
        return "halfblock"
    return None


def graphics_mode() -> str:
    """How this process draws images (decided on the first call; call it before the app runs)."""
    global _mode
    if _mode is None:
        out = sys.__stdout__
        mode = detect_mode(os.environ, bool(out and out.isatty()))
        if mode is None:
            mode = _ask_terminal()
        _mode = mode
    return _mode


def _ask_terminal() -> str:
    try:
        import textual_image.renderable as renderable    # queries the terminal on import
        import textual_image.widget  # noqa: F401 - asks the cell size in pixels, also only before the app runs
    except Exception:  # noqa: BLE001 - no answer, no pixels: half-blocks still work
        return "halfblock"
    if renderable.Image is renderable.SixelImage:
        return "sixel"
    if renderable.Image is renderable.TGPImage:
        return "kitty"
    return "halfblock"


# ---------------------------------------------------------------- half-blocks
_cache: OrderedDict[tuple, list[Strip]] = OrderedDict()


def fit(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """Cells (w, h) for an image of ``size`` pixels inside ``width``×``height`` cells, aspect kept
    (a cell is two pixels tall)."""
    iw, ih = max(1, size[0]), max(1, size[1])
    scale = min(width / iw, 2 * height / ih)
    return max(1, min(width, round(iw * scale))), max(1, min(height, round(ih * scale / 2)))


def halfblock_strips(path: str | Path, width: int, height: int) -> list[Strip]:
    """The image at ``path`` as at most ``height`` lines of ``width`` cells (cached by file, size, mtime).
    Raises OSError for a file that is missing or not an image."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, width, height)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    from PIL import Image as PILImage           # here, not at import: the first frame does not wait for it

    try:
        with PILImage.open(path) as image:
            image.draft("RGB", (width, height * 2))
            w, h = fit(image.size, width, height)
            small = image.convert("RGB").resize((w, h * 2), PILImage.Resampling.BOX)
    except (PILImage.UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise OSError(f"{path.name}: not an image ({err})") from None
    data = small.tobytes()
    rows = [[tuple(data[(y * w + x) * 3:(y * w + x) * 3 + 3]) for x in range(w)] for y in range(h * 2)]
    strips = []
    styles: dict[tuple, Style] = {}
    for y in range(0, h * 2, 2):
        segments = []
        for top, bottom in zip(rows[y], rows[y + 1]):
            k = (*top, *bottom)
            style = styles.get(k)
            if style is None:
                style = styles[k] = Style(color=Color.from_rgb(*top), bgcolor=Color.from_rgb(*bottom))
            segments.append(Segment("▀", style))
        strips.append(Strip(Segment.simplify(segments), w))
    _cache[key] = strips
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return strips


class HalfBlockImage(Widget):
    """An image file as half-block cells, centred in the widget; a one-line note when it cannot be read."""

    DEFAULT_CSS = "HalfBlockImage { width: 1fr; height: 1fr; }"

    def __init__(self, path: str | Path | None = None, *, note: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = str(path) if path else ""
        self.note = note

    def set_image(self, path: str | None, note: str = "") -> None:
        if (path or "") != self.path or note != self.note:
            self.path, self.note = path or "", note
            self.refresh()

    def _lines(self) -> list[Strip] | str:
        width, height = self.size
        if width <= 0 or height <= 0:
            return []
        if not self.path:
            return self.note or "no image"
        try:
            return halfblock_strips(self.path, width, height)
        except OSError as err:
            return f"missing: {Path(self.path).name}" if isinstance(err, FileNotFoundError) else str(err)

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        lines = self._lines()
        if isinstance(lines, str):
            if y != height // 2:
                return Strip.blank(width, self.rich_style)
            text = lines[:width].center(width)
            return Strip([Segment(text, self.rich_style + Style(dim=True))], width)
        top = (height - len(lines)) // 2
        if not 0 <= y - top < len(lines):
            return Strip.blank(width, self.rich_style)
        line = lines[y - top]
        left = (width - line.cell_length) // 2
        return Strip([Segment(" " * left, self.rich_style)] + list(line) +
                     [Segment(" " * (width - left - line.cell_length), self.rich_style)], width)


def image_widget(path: str | None, *, note: str = "", pixels: bool = True, **kwargs) -> Widget:
    """A widget showing ``path``: real pixels when ``pixels`` and the terminal draws them, else half-blocks."""
    mode = graphics_mode() if pixels and path and Path(path).is_file() else "halfblock"
    if mode == "halfblock":
        return HalfBlockImage(path, note=note, **kwargs)
    from textual_image.widget import SixelImage, TGPImage

    cls = SixelImage if mode == "sixel" else TGPImage
    return cls(path, **kwargs)
