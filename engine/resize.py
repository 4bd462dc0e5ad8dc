"""Resizing a training image (and its loss mask) to its bucket, as kohya's ``--resize_interpolation``.

kohya's rule (``library/utils.py: resize_image``): with no interpolation set, an image that shrinks
on both sides uses ``area``, any other ``lanczos``. ``lanczos`` and ``box`` resize with PIL (kohya
keeps PIL there for backward compatibility), every other method with OpenCV's ``cv2.resize``:
``nearest`` is ``INTER_NEAREST_EXACT``, ``bilinear``/``linear`` ``INTER_LINEAR``, ``bicubic``/``cubic``
``INTER_CUBIC``, ``area`` ``INTER_AREA``. The command line takes :data:`FLAG_CHOICES`; a dataset TOML
(subset, dataset or ``[general]``) also takes ``box``.

Each image's channels are resized alike, so a mask resized alone (an 8-bit ``L`` image) gets the
same values as the alpha channel of kohya's RGBA resize on the OpenCV path. The choices are light
(no numpy, PIL or OpenCV at import): the config model reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

FLAG_CHOICES = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
TOML_CHOICES = FLAG_CHOICES + ("box",)
_PIL = {"lanczos": "LANCZOS", "box": "BOX"}
_CV2 = {"nearest": "INTER_NEAREST_EXACT", "bilinear": "INTER_LINEAR", "linear": "INTER_LINEAR",
        "bicubic": "INTER_CUBIC", "cubic": "INTER_CUBIC", "area": "INTER_AREA"}


def method(interpolation: str | None, size: tuple[int, int], target: tuple[int, int]) -> str:
    """The method that resizes ``size`` (w, h) to ``target``: ``interpolation``, or kohya's default
    for it (``area`` when neither side grows, else ``lanczos``)."""
    if interpolation:
        return interpolation
    return "area" if size[0] >= target[0] and size[1] >= target[1] else "lanczos"


def resize(image: Any, target: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """A PIL image (RGB or L) or a uint8 array resized to ``target`` (w, h): uint8 HWC (HW for one
    channel), writable; returned as is (as an array) when it already has that size."""
    import numpy as np
    from PIL import Image

    is_pil = isinstance(image, Image.Image)
    size = image.size if is_pil else (image.shape[1], image.shape[0])
    target = (int(target[0]), int(target[1]))
    if tuple(size) == target:
        return np.array(image, dtype=np.uint8)
    how = method(interpolation, size, target)
    if how in _PIL:
        pil = image if is_pil else Image.fromarray(np.ascontiguousarray(image))
        return np.array(pil.resize(target, getattr(Image.Resampling, _PIL[how])), dtype=np.uint8)
    if how not in _CV2:
        raise ValueError(f"unknown resize interpolation {how!r}; use one of {', '.join(TOML_CHOICES)}")
    import cv2

    arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    return np.ascontiguousarray(cv2.resize(arr, target, interpolation=getattr(cv2, _CV2[how])))
