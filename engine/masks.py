"""Loss masks of kohya's ``--masked_loss``, per sample, moved with the image's pixels.

Where a mask comes from (kohya ``train_util``):

* ``alpha_mask`` subsets: the image's own transparency, ``alpha / 255`` (kohya loads the image as
  RGBA). An image without transparency has the all-ones mask. Only the alpha is read here: the
  RGB pixels still come from ``engine.images.to_rgb8``, unchanged.
* ``conditioning_data_dir`` subsets (kohya's ControlNet-style dataset): the image of the same stem
  in that folder, read as RGB; its red channel, normalised as kohya does (``(r/255 - 0.5)/0.5``,
  then ``/ 2 + 0.5``). Every image needs one, the folder may hold no other images, and it must be
  the image's size (kohya asserts all three).

The mask goes through the image's geometry: EXIF orientation, the resize to the bucket's
``resized_size`` (with the subset's ``resize_interpolation``, like the pixels), the centre, random or face crop
(replaying the same random draws), then the flip. One departure from kohya: kohya stretches a
conditioning image straight to the bucket size instead of resizing and centre-cropping it like
its image, so its mask drifts from the picture by up to half the cropped overhang; here it lies
exactly on the picture. With cached latents the mask follows the cached (un-augmented) crop, as
kohya caches the alpha mask with the latents. Masks are recomputed from the image files, never
stored in the latent cache.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.augment import crop_offsets, face_crop
from engine.buckets import resize_and_crop, resize_only
from engine.errors import DatasetError
from engine.images import _UPRIGHT, exif_orientation, image_size, load_rgb8

if TYPE_CHECKING:
    import torch

    from engine.dataset import DatasetPlan

__all__ = ["LossMasks", "attach_masks", "conditioning_pairs", "read_alpha"]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def read_alpha(path: Path):
    """The image's transparency as an upright 8-bit 'L' image, or None when it has none (all opaque)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = exif_orientation(im)
            if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
                return None
            alpha = im.convert("RGBA").getchannel("A")
    except Exception as err:  # PIL raises several types for broken files
        raise DatasetError(f"cannot read the transparency of {path}: {type(err).__name__}: {err}; "
                           f"replace the file") from None
    if orientation != 1:
        alpha = alpha.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
    return alpha


def _red(path: Path):
    return load_rgb8(path).getchannel("R")


def conditioning_pairs(image_paths: list[Path], folder: Path, where: str, extensions: tuple[str, ...]
                       ) -> dict[Path, Path]:
    """{image: its conditioning image}: kohya's pairing by stem, with its checks as one-line errors."""
    if not folder.is_dir():
        raise DatasetError(f"{where}: conditioning_data_dir {folder} is not a folder; fix the path")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    by_stem: dict[str, Path] = {}
    for p in found:
        by_stem.setdefault(p.stem, p)
    pairs, missing = {}, []
    for image in image_paths:
        cond = by_stem.get(image.stem)
        if cond is None:
            missing.append(image.name)
            continue
        if image_size(cond) != image_size(image):
            w, h = image_size(cond)
            raise DatasetError(f"{where}: conditioning image {cond} is {w}x{h} but {image.name} is "
                               f"{image_size(image)[0]}x{image_size(image)[1]}; a mask must have its image's size")
        pairs[image] = cond
    if missing:
        raise DatasetError(f"{where}: no conditioning image in {folder} for {len(missing)} image(s) "
                           f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); add masks with the same "
                           f"names")
    used = set(pairs.values())
    extra = [p.name for p in found if p not in used]
    if extra:
        raise DatasetError(f"{where}: {len(extra)} image(s) in conditioning_data_dir {folder} have no training image "
                           f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); remove them (kohya refuses "
                           f"them too)")
    return pairs


class LossMasks:
    """Each entry's mask at its bucket size, kept in memory like its pixels."""

    def __init__(self, plan: "DatasetPlan", conditioning: dict[Path, Path]) -> None:
        self.plan = plan
        self.conditioning = conditioning
        self._plain: dict[int, np.ndarray | None] = {}
        self._source: dict[int, object] = {}

    def has_mask(self, entry_index: int) -> bool:
        sub = self.plan.subset_of(entry_index)
        return sub.alpha_mask or sub.conditioning_data_dir is not None

    def _source_image(self, entry_index: int):
        """The mask source as an 'L' image of the upright image's size (None: all ones)."""
        if entry_index in self._source:
            return self._source[entry_index]
        e = self.plan.entries[entry_index]
        cond = self.conditioning.get(e.path)
        img = _red(cond) if cond is not None else read_alpha(e.path)
        if img is not None and img.size != e.image_size:
            raise DatasetError(f"mask of {e.path} is {img.size[0]}x{img.size[1]}, the image "
                               f"{e.image_size[0]}x{e.image_size[1]}; restart the run")
        if self.plan.cache_images:
            self._source[entry_index] = img
        return img

    def _values(self, arr: np.ndarray | None, entry_index: int) -> np.ndarray:
        e = self.plan.entries[entry_index]
        if arr is None:
            return np.ones((e.bucket[1], e.bucket[0]), dtype=np.float32)
        if e.path in self.conditioning:   # kohya: ToTensor, Normalize(0.5, 0.5), then / 2 + 0.5
            import torch

            t = torch.from_numpy(np.ascontiguousarray(arr)).float().div(255)
            return (((t - 0.5) / 0.5) / 2 + 0.5).numpy()
        return arr.astype(np.float32) / 255.0

    def plain(self, entry_index: int) -> np.ndarray:
        """The mask under the entry's centre crop (what cached latents hold), not flipped."""
        got = self._plain.get(entry_index)
        if got is None:
            e = self.plan.entries[entry_index]
            src = self._source_image(entry_index)
            arr = None if src is None else resize_and_crop(src, e.bucket, e.resized_size,
                                                           self.plan.subset_of(entry_index).resize_interpolation)
            got = self._values(arr, entry_index)
            if self.plan.cache_images:
                self._plain[entry_index] = got
        return got

    def augmented(self, entry_index: int, rng_state) -> np.ndarray:
        """The mask under the crop the pixels got, replaying their draws from ``rng_state``."""
        plan = self.plan
        if not plan.augments(entry_index):
            return self.plain(entry_index)
        e = plan.entries[entry_index]
        sub = plan.subset_of(entry_index)
        src = self._source_image(entry_index)
        if src is None:
            return self._values(None, entry_index)
        rng = random.Random()
        rng.setstate(rng_state)
        if plan._face_crops(entry_index):
            arr = face_crop(src, e.face, plan.datasets[e.dataset_index].resolution, sub.face_crop_aug_range,
                            sub.random_crop, rng, sub.resize_interpolation)
        elif sub.random_crop:
            arr = resize_only(src, e.resized_size, sub.resize_interpolation)
            left, top = crop_offsets((arr.shape[1], arr.shape[0]), e.bucket, True, rng)
            arr = arr[top:top + e.bucket[1], left:left + e.bucket[0]]
        else:
            return self.plain(entry_index)
        return self._values(arr, entry_index)

    def batch(self, entry_indices: list[int], flipped: list[bool], states: list | None) -> "torch.Tensor | None":
        """(B, H, W) float32 masks, or None when no sample of the batch has one (kohya: the others get ones).
        ``states`` None: the centre crop of cached latents."""
        import torch

        if not any(self.has_mask(i) for i in entry_indices):
            return None
        out = []
        for n, (i, flip) in enumerate(zip(entry_indices, flipped)):
            if not self.has_mask(i):
                e = self.plan.entries[i]
                arr = np.ones((e.bucket[1], e.bucket[0]), dtype=np.float32)
            else:
                arr = self.plain(i) if states is None else self.augmented(i, states[n])
            out.append(torch.from_numpy(np.ascontiguousarray(arr[:, ::-1] if flip else arr)))
        return torch.stack(out)


def attach_masks(plan: "DatasetPlan", masked_loss: bool, extensions: tuple[str, ...]) -> None:
    """Give ``plan`` (and its validation plan) their ``LossMasks`` when a subset has masks."""
    subsets = [s for ds in plan.datasets for s in ds.subsets]
    if not any(s.alpha_mask or s.conditioning_data_dir is not None for s in subsets):
        if masked_loss:
            plan.warnings.append("--masked_loss: no subset has alpha_mask or conditioning_data_dir, so the loss is "
                                 "not masked (as in kohya)")
        return
    conditioning: dict[Path, Path] = {}
    for di, ds in enumerate(plan.datasets):
        for si, sub in enumerate(ds.subsets):
            if sub.conditioning_data_dir is None:
                continue
            paths = [e.path for p in (plan, plan.validation) if p is not None for e in p.entries
                     if (e.dataset_index, e.subset_index) == (di, si)]
            conditioning.update(conditioning_pairs(sorted(set(paths)), sub.conditioning_data_dir, sub.where,
                                                   extensions))
    for p in (plan, plan.validation):
        if p is not None:
            p.masks = LossMasks(p, conditioning)
