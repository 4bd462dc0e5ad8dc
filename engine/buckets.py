"""Aspect-ratio buckets with kohya sd-scripts semantics (``BucketManager``).

* ``make_bucket_resolutions``: the predefined bucket list: a square bucket of about
  the target area, plus every ``(w, h)`` with ``w`` from ``min_size`` to ``max_size``
  in ``steps`` and ``h`` the largest multiple of ``steps`` keeping ``w * h`` within
  the target area (capped at ``max_size``), and its transpose.
* ``BucketSelector.select``: without ``no_upscale`` an image goes to the predefined
  bucket with the nearest aspect ratio (first one wins a tie, buckets sorted), and is
  resized so it covers the bucket; the overhang is center-cropped later. With
  ``no_upscale`` the bucket comes from the image itself: its size (scaled down to the
  target area when larger, rounded to ``steps``) rounded down to multiples of
  ``steps``, so no image is ever upscaled.
* Without bucketing there is a single bucket, the target resolution, and the same
  "cover then center-crop" rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """Kohya's predefined bucket resolutions, sorted, for target area ``w * h`` of ``max_reso``."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos: set[tuple[int, int]] = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    reso: tuple[int, int]          # bucket (width, height)
    resized_size: tuple[int, int]  # size the image is resized to before the center crop
    ar_error: float                # bucket aspect ratio minus image aspect ratio


class BucketSelector:
    """Chooses an image's bucket and resize target (kohya ``BucketManager.select_bucket``)."""

    def __init__(
        self,
        resolution: tuple[int, int],
        *,
        enable_bucket: bool,
        no_upscale: bool = False,
        min_size: int = 256,
        max_size: int = 1024,
        steps: int = 64,
    ) -> None:
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.max_area = self.resolution[0] * self.resolution[1]
        self.enable_bucket = enable_bucket
        self.no_upscale = bool(enable_bucket and no_upscale)
        self.steps = steps
        if not enable_bucket:
            self.predefined = [self.resolution]
        elif self.no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(self.resolution, min_size, max_size, steps)
        self._predefined_set = set(self.predefined)
        self._predefined_ars = np.array([w / h for w, h in self.predefined], dtype=np.float64)

    def _round_to_steps(self, x: float) -> int:
        v = int(x + 0.5)
        return v - v % self.steps

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        aspect = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self._predefined_set:
                idx = int(np.abs(self._predefined_ars - aspect).argmin())
                reso = self.predefined[idx]
            if aspect > reso[0] / reso[1]:      # image is wider: fit the height
                scale = reso[1] / image_height
            else:                               # taller or equal: fit the width
                scale = reso[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                w_round = self._round_to_steps(rw)
                h_in_wr = self._round_to_steps(w_round / aspect)
                h_round = self._round_to_steps(rh)
                w_in_hr = self._round_to_steps(h_round * aspect)
                ar_wr = w_round / h_in_wr if h_in_wr else math.inf
                ar_hr = w_in_hr / h_round if h_round else math.inf
                if abs(ar_wr - aspect) < abs(ar_hr - aspect):
                    resized = (w_round, int(w_round / aspect + 0.5))
                else:
                    resized = (int(h_round * aspect + 0.5), h_round)
            else:
                resized = (image_width, image_height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        ar_error = (reso[0] / reso[1]) - aspect if reso[1] else math.inf
        return BucketChoice(reso, resized, ar_error)


def resize_and_crop(image, reso: tuple[int, int], resized_size: tuple[int, int],
                    interpolation: str | None = None) -> np.ndarray:
    """Resize a PIL RGB image to ``resized_size`` then center-crop to ``reso``; uint8 HWC.

    ``interpolation``: kohya's ``resize_interpolation`` (``engine.resize``; None: area down, Lanczos up).
    """
    arr = resize_only(image, resized_size, interpolation)
    h, w = arr.shape[:2]
    if w > reso[0]:
        p = (w - reso[0]) // 2
        arr = arr[:, p:p + reso[0]]
    if h > reso[1]:
        p = (h - reso[1]) // 2
        arr = arr[p:p + reso[1]]
    if arr.shape[0] != reso[1] or arr.shape[1] != reso[0]:
        raise ValueError(f"resize_and_crop produced {arr.shape[1]}x{arr.shape[0]}, expected {reso[0]}x{reso[1]}")
    return np.ascontiguousarray(arr)


def resize_only(image, resized_size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize a PIL image to ``resized_size`` with kohya's ``resize_interpolation``; uint8 HWC, writable."""
    from engine.resize import resize

    return resize(image, resized_size, interpolation)
