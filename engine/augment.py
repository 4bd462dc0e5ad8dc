"""kohya's random image augmentations on 8-bit HWC arrays: ``color_aug``, ``random_crop`` and
``face_crop_aug_range``, each drawing from the caller's ``random.Random`` in kohya's order.

* ``color_aug`` (kohya ``AugHelper.color_aug``): with probability 0.33 either (one more
  draw > 0.5) a hue shift of ``uniform(-8, 8)`` on OpenCV's 0..180 hue scale, or a gamma
  ``uniform(0.95, 1.05)`` applied as ``clip(pixel ** gamma, 0, 255)`` on the 0..255 values
  (kohya does not normalise first, so bright pixels saturate). kohya converts its RGB array
  with ``COLOR_BGR2HSV``, i.e. it reads red as blue; ``hue_shift`` does the same, with
  OpenCV's 8-bit conversion rules re-implemented (no OpenCV dependency).
* ``crop_offsets`` (kohya ``trim_and_resize_if_required``): the overhang of a resized image is
  trimmed at its centre, or at ``randint(0, overhang)`` (width first) with ``random_crop``.
* ``face_crop`` (kohya ``crop_target``, used only without bucketing): the face position comes
  from the file name ``<name>_<cx>_<cy>_<w>_<h>``; the image is scaled so the face spans
  ``1/range`` of the shorter side and cropped around it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from engine.errors import DatasetError

HUE_SHIFT_LIMIT = 8
_SHIFT = 12


def _bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(img, COLOR_BGR2HSV)`` for uint8 (H in 0..179), in integer arithmetic as OpenCV does."""
    b, g, r = (img[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    idx = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(idx > 0, np.rint((255 << _SHIFT) / idx), 0).astype(np.int64)
        hdiv = np.where(idx > 0, np.rint((180 << _SHIFT) / (6.0 * idx)), 0).astype(np.int64)
    half = 1 << (_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([np.clip(h, 0, 255), np.clip(s, 0, 255), v], axis=-1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def _hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(hsv, COLOR_HSV2BGR)`` for uint8: float32 sector arithmetic, rounded to nearest
    (equal to opencv-python-headless on every one of the 180x256x256 HSV values)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.where(h >= 6, h - 6, h)
    sector = np.floor(h).astype(np.int64)
    frac = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector = np.where(bad, 0, sector)
    frac = np.where(bad, np.float32(0), frac).astype(np.float32)
    one = np.float32(1.0)
    s64 = s.astype(np.float64)   # 1 - s*h fused in one rounding, as OpenCV's SIMD build computes it
    q = (1.0 - s64 * frac).astype(np.float32)
    t = (1.0 - s64 * (one - frac)).astype(np.float32)
    tab = np.stack([v, v * (one - s), v * q, v * t], axis=-1)
    out = np.take_along_axis(tab, _SECTORS[sector], axis=-1)
    out = np.where((s == 0)[..., None], v[..., None], out)
    return np.clip(np.rint(out * np.float32(255.0)), 0, 255).astype(np.uint8)


def hue_shift(img: np.ndarray, shift: float) -> np.ndarray:
    """kohya's hue step: BGR→HSV on the RGB array, ``(H + shift) % 180`` truncated to uint8, back to BGR."""
    hsv = _bgr_to_hsv(img)
    if shift < 0:
        shift = 180 + shift
    hsv[..., 0] = ((hsv[..., 0] + shift) % 180).astype(np.uint8)
    return _hsv_to_bgr(hsv)


def color_aug(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya ``color_aug`` on a uint8 HWC RGB array (see the module docstring)."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            return hue_shift(img, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
        gamma = rng.uniform(0.95, 1.05)
        return np.clip(img.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return img


def crop_offsets(size: tuple[int, int], reso: tuple[int, int], random_crop: bool,
                 rng: random.Random | None) -> tuple[int, int]:
    """(left, top) to trim a ``size`` (w, h) image to ``reso``: centred, or random with ``random_crop``."""
    offsets = []
    for have, want in zip(size, reso):
        trim = have - want
        if trim <= 0:
            offsets.append(0)
        elif random_crop:
            offsets.append(rng.randint(0, trim))
        else:
            offsets.append(trim // 2)
    return offsets[0], offsets[1]


def face_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a name ``<name>_<cx>_<cy>_<w>_<h>`` (kohya), None when it has fewer parts."""
    tokens = path.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        raise DatasetError(
            f"image {path}: face_crop_aug_range reads the face from the name <name>_<cx>_<cy>_<w>_<h>, but "
            f"{'_'.join(tokens[-4:])!r} are not whole numbers; rename it or remove face_crop_aug_range") from None
    if cx <= 0:
        return None                 # kohya: no face position
    if max(w, h) <= 0:
        raise DatasetError(f"image {path}: face size {w}x{h} in its name must be positive for face_crop_aug_range")
    return cx, cy, w, h


def face_crop(img, face: tuple[int, int, int, int], target: tuple[int, int], face_range: tuple[float, float],
              random_crop: bool, rng: random.Random, interpolation: str | None = None) -> np.ndarray:
    """kohya ``crop_target``: a PIL RGB image → uint8 HWC of ``target`` (w, h) around the face, scaled
    with the subset's ``resize_interpolation`` (``engine.resize``)."""
    from engine.resize import resize

    width, height = img.size
    tw, th = target
    if (width, height) == (tw, th):
        return np.array(img, dtype=np.uint8)
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    size = min(th, tw)
    min_scale = max(th / height, tw / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    if nh < th or nw < tw:
        raise DatasetError(f"image {width}x{height} is smaller than the resolution {tw}x{th}; face_crop_aug_range "
                           f"needs images at least that large")
    arr = resize(img, (nw, nh), interpolation)
    face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
    for axis, (want, length, face_p) in enumerate(zip((th, tw), (nh, nw), (face_cy, face_cx))):
        p1 = face_p - want // 2
        if random_crop:
            spread = max(length - face_p, face_p)
            p1 = p1 + (rng.randint(0, spread) + rng.randint(0, spread)) - spread
        elif face_range[0] != face_range[1] and face_size > size // 10 and face_size >= 40:
            p1 = p1 + rng.randint(-face_size // 20, +face_size // 20)
        p1 = max(0, min(p1, length - want))
        arr = arr[p1:p1 + want] if axis == 0 else arr[:, p1:p1 + want]
    return np.ascontiguousarray(arr)


def face_check(path: Path, size: tuple[int, int], target: tuple[int, int]) -> None:
    """Plan-time: a face-cropped image must be at least the target size (kohya asserts it)."""
    if size[0] < target[0] or size[1] < target[1]:
        raise DatasetError(f"image {path} ({size[0]}x{size[1]}) is smaller than the resolution "
                           f"{target[0]}x{target[1]}; face_crop_aug_range crops without upscaling, use a larger image")


__all__ = ["color_aug", "hue_shift", "crop_offsets", "face_from_name", "face_crop", "face_check"]
