"""The compare grid as one PNG contact sheet (Pillow), for sharing: a row per checkpoint, a column per prompt.

Labels: each row's step, checkpoint file and validation loss (the best row framed and starred), each
column's prompt. The file is written next to its final path and moved there (``os.replace``), so a
reader never sees half a sheet, and an existing file is kept unless ``overwrite``.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from cockpit.samples import CompareRow, format_loss
from engine.api import ConfigError, write_file

THUMB = 256                 # each image fits a THUMB×THUMB box
LABEL_WIDTH = 240
HEADER_HEIGHT = 64
PAD = 8
BACKGROUND = (24, 24, 28)
TEXT = (230, 230, 230)
MUTED = (150, 150, 160)
GOLD = (255, 196, 0)


def sheet_size(rows: int, columns: int) -> tuple[int, int]:
    """The sheet's (width, height) in pixels for ``rows`` checkpoints and ``columns`` prompts."""
    return (LABEL_WIDTH + columns * (THUMB + PAD) + PAD, HEADER_HEIGHT + rows * (THUMB + PAD) + PAD)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):      # no FreeType: the bitmap font, one size
        return ImageFont.load_default()


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    points = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
               cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    draw.polygon(points, fill=GOLD)


def render_sheet(rows: tuple[CompareRow, ...], prompts: tuple[str, ...]) -> Image.Image:
    """The contact sheet as an image."""
    width, height = sheet_size(len(rows), len(prompts))
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(18), _font(14)
    for c, prompt in enumerate(prompts):
        x = LABEL_WIDTH + c * (THUMB + PAD)
        lines = textwrap.wrap(f"{c}: {prompt}", width=32)[:3] or [f"{c}:"]
        for i, line in enumerate(lines):
            draw.text((x, PAD + i * 17), line, fill=TEXT, font=small)
    for r, row in enumerate(rows):
        y = HEADER_HEIGHT + r * (THUMB + PAD)
        if row.best:
            draw.rectangle((2, y - 3, width - 3, y + THUMB + 2), outline=GOLD, width=3)
            _star(draw, PAD + 10, y + 22, 10)
        draw.text((PAD + (26 if row.best else 0), y + 12), f"step {row.step}", fill=GOLD if row.best else TEXT,
                  font=big)
        draw.text((PAD, y + 44), row.name or "(samples only)", fill=MUTED, font=small)
        draw.text((PAD, y + 66), f"val loss {format_loss(row.validation)}", fill=TEXT, font=small)
        if row.best:
            draw.text((PAD, y + 88), "best validation loss", fill=GOLD, font=small)
        for c, image in enumerate(row.images):
            x = LABEL_WIDTH + c * (THUMB + PAD)
            _paste(sheet, draw, image.path if image else "", (x, y), small,
                   (image.error if image and image.error else "no image"))
    return sheet


def _paste(sheet: Image.Image, draw: ImageDraw.ImageDraw, path: str, at: tuple[int, int], font, note: str) -> None:
    x, y = at
    try:
        with Image.open(path) as source:
            thumb = ImageOps.contain(source.convert("RGB"), (THUMB, THUMB), Image.Resampling.LANCZOS)
    except (OSError, ValueError):
        draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), outline=MUTED)
        text = f"missing: {Path(path).name}" if path else note
        draw.text((x + 8, y + THUMB // 2 - 8), text[:36], fill=MUTED, font=font)
        return
    sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))


def write_sheet(rows: tuple[CompareRow, ...], prompts: tuple[str, ...], out: Path, *,
                overwrite: bool = False) -> tuple[Path, tuple[int, int], int]:
    """Write the sheet to ``out`` atomically; (path, (width, height), bytes)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--sheet {out}: the contact sheet is a PNG; name it something.png")
    if out.exists() and not overwrite:
        raise ConfigError(f"--sheet {out}: the file exists; pass --overwrite to replace it, or choose another name")
    if not out.parent.is_dir():
        raise ConfigError(f"--sheet {out}: folder {out.parent} does not exist")
    if not any(image and image.path for row in rows for image in row.images):
        raise ConfigError("no sample images in this run to put on a sheet (train with --sample_prompts to make "
                          "them at each checkpoint)")
    sheet = render_sheet(rows, prompts)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    write_file(out, buffer.getvalue())       # the project's one atomic writer (temp, fsync, rename)
    return out, sheet.size, out.stat().st_size
