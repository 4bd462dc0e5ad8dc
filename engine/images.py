"""Image files → the 8-bit RGB pixels training sees, and the size they are bucketed at.

Every image goes through ``to_rgb8`` (pixels) and ``oriented_size`` (plan-time size),
so the size a bucket is chosen for is the size of the pixels that are later cropped.
The rules, mode by mode, are in ``to_rgb8``'s docstring.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import DatasetError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["to_rgb8", "oriented_size", "exif_orientation", "load_rgb8", "image_size", "UnreadableSamples"]

ORIENTATION_TAG = 0x0112
# EXIF orientation → Image.Transpose member name that shows the picture upright
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


class UnreadableSamples(ValueError):
    """Pixel values whose brightness scale cannot be known (the message says which and what to do)."""


def exif_orientation(img: "Image.Image") -> int:
    """The EXIF orientation (1..8; 1 = as stored) of a freshly opened image, read without decoding pixels.

    For PNG only an eXIf chunk before the pixel data counts: finding a later one means
    decoding the whole file, which the plan-time scan does not do for every image.
    """
    from PIL import Image

    if img.format == "PNG":
        exif = Image.Exif()
        raw = img.info.get("exif")
        if raw:
            exif.load(raw)
    else:
        exif = img.getexif()
    value = exif.get(ORIENTATION_TAG, 1)
    return value if value in _UPRIGHT else 1


def oriented_size(img: "Image.Image") -> tuple[int, int]:
    """(width, height) as the picture is shown, i.e. after ``to_rgb8`` turns it upright."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def _from_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255, rounded (v / 257)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_rgb8(img: "Image.Image") -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16"):
        return _from_16bit(np.asarray(img))
    if mode == "I":
        a = np.asarray(img, dtype=np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise UnreadableSamples(
                f"holds 32-bit integer samples from {lo} to {hi}; only 0..65535 (16-bit) can be read as "
                f"brightness; save it as an 8- or 16-bit PNG")
        return _from_16bit(a)
    a = np.asarray(img, dtype=np.float64)              # mode F
    if not np.isfinite(a).all():
        raise UnreadableSamples("holds NaN or infinite float samples; save it as an 8- or 16-bit PNG")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 255:
        raise UnreadableSamples(
            f"holds float samples from {lo:g} to {hi:g}; only 0..1 or 0..255 can be read as brightness; "
            f"save it as an 8- or 16-bit PNG")
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.rint(a * scale).astype(np.uint8)


def to_rgb8(img: "Image.Image") -> "Image.Image":
    """A new 8-bit RGB image of ``img`` (pass it freshly opened: the orientation is read first).

    * 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, ...): Pillow's own conversion
      (CMYK as (255-C)(255-K)/255; ICC profiles are not applied, as in kohya).
    * Transparency (LA, PA, RGBA, P with a transparent colour): alpha is dropped and each
      pixel keeps the colour stored under it, as kohya's ``load_image`` (``convert("RGB")``)
      does. Compositing over a background would train the same folder differently here
      than in kohya; put the background you want into the files.
    * 16-bit grayscale (I;16, I;16B, I;16L, and I from 16-bit PGM/PNG): 0..65535 scaled to
      0..255 with rounding (Pillow's convert clips at 255, which turns them near-white).
      48/64-bit RGB(A) PNGs are already reduced to 8 bits per channel by Pillow when it
      opens them (it keeps the high byte), so they arrive as RGB/RGBA.
    * 32-bit integer (I): read as 0..65535; values outside it have no known scale and
      are refused (``UnreadableSamples``) rather than clipped.
    * 32-bit float (F): 0..1 when every value is within 0..1 (the float-image
      convention), else 0..255 (Pillow's own F range); anything outside 0..255, NaN or
      infinity is refused.
    * EXIF orientation: turned upright as viewers show it (kohya trains the stored,
      unrotated pixels). The user crops and captions the picture they see, so a phone
      photo must not train lying on its side; ``oriented_size`` gives the matching size.
    """
    from PIL import Image

    orientation = exif_orientation(img)
    mode = img.mode
    if mode == "RGB":
        rgb = img.copy()
    elif mode.startswith("I") or mode == "F":
        rgb = Image.fromarray(np.repeat(_gray_to_rgb8(img)[:, :, None], 3, axis=2), "RGB")
    elif mode in ("P", "PA"):
        rgb = img.convert("RGBA").convert("RGB")      # palette colours; transparency dropped like alpha
    else:
        rgb = img.convert("RGB")
    if orientation != 1:
        rgb = rgb.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
    return rgb


def _unreadable(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(f"cannot read image {path}: {type(err).__name__}: {err}; replace or delete the file")


def load_rgb8(path: Path) -> "Image.Image":
    """Decode ``path`` with ``to_rgb8``; one-line ``DatasetError`` if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except UnreadableSamples as err:
        raise DatasetError(f"image {path} {err}") from None
    except Exception as err:  # PIL raises several types for broken files
        raise _unreadable(path, err) from None


def image_size(path: Path) -> tuple[int, int]:
    """The upright (width, height) of ``path`` from its header; one-line ``DatasetError`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = oriented_size(im)
    except Exception as err:  # PIL raises several types for broken files
        raise _unreadable(path, err) from None
    if w < 1 or h < 1:
        raise DatasetError(f"image {path} has size {w}x{h}; replace or delete the file")
    return w, h
