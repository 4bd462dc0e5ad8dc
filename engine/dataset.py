"""The dataset layer: images, captions, repeats, buckets and batches (kohya semantics).

``load_dataset_plan(DatasetArgs)`` scans everything up front (image headers, caption
files, buckets) and raises one-line ``DatasetError``s; the returned ``DatasetPlan``
then serves deterministic epoch orders and decoded batches.

Kohya parity notes (train_util.py / config_util.py):

* Captions (``engine.captions``): ``<image stem><caption_extension>`` read as UTF-8 (a BOM
  is dropped), first line, stripped. No caption file → the subset's ``class_tokens``;
  neither → error. An empty caption file is an error too (kohya would train on an empty
  caption). Images that fall back to class tokens while a .txt/.caption/.tags file sits
  beside them get one plan warning per subset naming the flag to set.
* Regularisation images are balanced per dataset like kohya's DreamBoothDataset: reg
  images are registered in order with their repeats until they reach the dataset's
  train count; if they fall short, repeats are added one image at a time, round-robin.
  Reg images that are not needed are left out of ``entries`` (with a warning).
* Sample ids are repeat-expanded: entry ``i`` owns ids
  ``sample_offsets[i] .. sample_offsets[i] + entries[i].num_repeats - 1``.
* Each dataset has its own buckets and batch size (kohya's DatasetGroup); an epoch's
  batches never mix buckets or datasets.
* ``shuffle_caption``: split on ",", strip, drop empty tags, keep the first
  ``keep_tokens`` tags in place, shuffle the rest, join with ", ". Without
  ``shuffle_caption`` the caption is used as written (kohya: keep_tokens alone does
  nothing).
* ``num_reg_images`` is kohya's count before balancing (reg images x their repeats).
* Pixels come from ``engine.images`` (every Pillow mode to 8-bit RGB, EXIF-upright; the
  bucket is chosen for the upright size). See ``to_rgb8`` for where that departs from kohya.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.buckets import BucketSelector, resize_and_crop
from engine.captions import caption_extension_warning, process_caption, read_caption
from engine.dataset_config import DatasetArgs, DatasetSpec, SubsetSpec, resolve_dataset_specs
from engine.errors import ConfigError, DatasetError
from engine.images import image_size, load_rgb8

if TYPE_CHECKING:
    import torch

__all__ = [
    "DatasetArgs", "DatasetPlan", "ImageEntry", "Batch", "load_dataset_plan",
    "compute_total_steps", "process_caption", "IMAGE_EXTENSIONS", "DEFAULT_MAX_TRAIN_STEPS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_TRAIN_STEPS = 1600  # kohya's --max_train_steps default


@dataclass
class ImageEntry:
    """One image file of one subset (not one per repeat)."""

    path: Path
    caption: str                       # raw caption (file's first line, or class_tokens)
    is_reg: bool
    num_repeats: int                   # effective repeats (reg: after balancing)
    bucket: tuple[int, int]            # (width, height) the image is cropped to
    resized_size: tuple[int, int]      # size it is resized to before the center crop
    image_size: tuple[int, int]        # original (width, height), upright (EXIF orientation applied)
    shuffle_caption: bool
    keep_tokens: int
    flip_aug: bool
    caption_from_file: bool            # False: the caption is the subset's class_tokens
    dataset_index: int
    subset_index: int
    ar_error: float = 0.0              # bucket aspect ratio minus the image's


@dataclass
class Batch:
    pixel_values: "torch.Tensor"       # float32 [B, 3, H, W] in [-1, 1]
    captions: list[str]                # after shuffle_caption / keep_tokens
    is_reg: "torch.Tensor"             # bool [B]
    flipped: list[bool]
    entry_indices: list[int]
    sample_ids: list[int]
    bucket: tuple[int, int]            # (width, height)


def _list_images(subset: SubsetSpec) -> list[Path]:
    d = subset.image_dir
    if not d.is_dir():
        what = "is not a folder" if d.exists() else "does not exist"
        raise DatasetError(f"{subset.where}: image_dir {d} {what}; fix the path")
    images = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(
            f"{subset.where}: no images in {d}; add .png/.jpg/.jpeg/.webp/.bmp files or remove this subset"
        )
    return images


class DatasetPlan:
    """Everything known about the dataset before training; see the module docstring."""

    def __init__(self, datasets: list[DatasetSpec], entries: list[ImageEntry], warnings: list[str],
                 subset_images: list[list[tuple[SubsetSpec, int, list[str]]]]) -> None:
        self.datasets = datasets
        self.entries = entries
        self.warnings = warnings
        self.subset_images = subset_images  # per dataset: (subset, image count, captions of all its images)
        self.sample_offsets: list[int] = []
        n = 0
        for e in entries:
            self.sample_offsets.append(n)
            n += e.num_repeats
        self.num_samples = n
        # per dataset: sorted list of (bucket reso, [sample ids in registration order])
        self.dataset_buckets: list[list[tuple[tuple[int, int], list[int]]]] = []
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for di in range(len(datasets)):
            per: dict[tuple[int, int], list[int]] = {}
            for ei, e in enumerate(entries):
                if e.dataset_index != di:
                    continue
                start = self.sample_offsets[ei]
                per.setdefault(e.bucket, []).extend(range(start, start + e.num_repeats))
                self.buckets.setdefault(e.bucket, []).append(ei)
            self.dataset_buckets.append(sorted(per.items()))
        self.buckets = dict(sorted(self.buckets.items()))
        self.batches_per_epoch = sum(
            math.ceil(len(ids) / ds.batch_size)
            for ds, buckets in zip(datasets, self.dataset_buckets)
            for _, ids in buckets
        )
        self.num_train_images = sum(
            s.num_repeats * count for subs in subset_images for s, count, _ in subs if not s.is_reg
        )
        self.num_reg_images = sum(
            s.num_repeats * count for subs in subset_images for s, count, _ in subs if s.is_reg
        )
        self._cache: dict[int, np.ndarray] = {}
        self.cache_images = True

    # ---- facts (kohya's metadata is built from them in engine.kohya.dataset_metadata) ----
    @property
    def batch_size(self) -> int:
        """The first dataset's batch size (kohya's ss_batch_size_per_device)."""
        return self.datasets[0].batch_size

    # ---- order ----------------------------------------------------------------------
    def sample_to_entry(self, sample_id: int) -> int:
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} out of range 0..{self.num_samples - 1}")
        return bisect.bisect_right(self.sample_offsets, sample_id) - 1

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The batches of one epoch: each bucket's sample ids shuffled and cut into
        batches of the dataset's batch size (the last may be short), then the batch
        list shuffled. Deterministic for (epoch, seed) via ``random.Random(seed + epoch)``
        (kohya seeds its shuffle with seed + epoch); the global RNG is not touched.
        """
        rng = random.Random(int(seed) + int(epoch))
        batches: list[list[int]] = []
        for ds, buckets in zip(self.datasets, self.dataset_buckets):
            bs = ds.batch_size
            for _, ids in buckets:
                ids = list(ids)
                rng.shuffle(ids)
                batches.extend(ids[i:i + bs] for i in range(0, len(ids), bs))
        rng.shuffle(batches)
        return batches

    # ---- pixels ---------------------------------------------------------------------
    def _array(self, entry_index: int) -> np.ndarray:
        arr = self._cache.get(entry_index)
        if arr is not None:
            return arr
        e = self.entries[entry_index]
        im = load_rgb8(e.path)
        if im.size != e.image_size:
            raise DatasetError(f"image {e.path} changed size since the dataset was scanned; restart the run")
        arr = resize_and_crop(im, e.bucket, e.resized_size)
        if self.cache_images:
            self._cache[entry_index] = arr
        return arr

    def load_image(self, entry_index: int, flip: bool = False) -> "torch.Tensor":
        """[3, H, W] float32 in [-1, 1], resized and center-cropped to the entry's bucket."""
        import torch

        arr = self._array(entry_index)
        if flip:
            arr = arr[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        return t.div_(127.5).sub_(1.0)

    def load_batch(self, batch: list[int], rng: random.Random) -> Batch:
        """Decode one batch of sample ids (all from one bucket). Per sample, in order:
        flip (if the subset has flip_aug: ``rng.random() < 0.5``), then the caption.
        """
        import torch

        if not batch:
            raise ValueError("load_batch: empty batch")
        entry_indices = [self.sample_to_entry(s) for s in batch]
        bucket = self.entries[entry_indices[0]].bucket
        images, captions, flipped = [], [], []
        for ei in entry_indices:
            e = self.entries[ei]
            if e.bucket != bucket:
                raise ValueError(f"load_batch: samples from buckets {bucket} and {e.bucket} cannot share a batch")
            flip = bool(e.flip_aug and rng.random() < 0.5)
            images.append(self.load_image(ei, flip=flip))
            captions.append(process_caption(e.caption, e.shuffle_caption, e.keep_tokens, rng))
            flipped.append(flip)
        return Batch(
            pixel_values=torch.stack(images),
            captions=captions,
            is_reg=torch.tensor([self.entries[ei].is_reg for ei in entry_indices], dtype=torch.bool),
            flipped=flipped,
            entry_indices=entry_indices,
            sample_ids=list(batch),
            bucket=bucket,
        )


def load_dataset_plan(args: DatasetArgs) -> DatasetPlan:
    """Scan images, captions and buckets for ``args``; raises ``DatasetError``."""
    warnings: list[str] = []
    specs = resolve_dataset_specs(args, warnings)
    entries: list[ImageEntry] = []
    subset_images: list[list[tuple[SubsetSpec, int, list[str]]]] = []
    for di, ds in enumerate(specs):
        selector = BucketSelector(
            ds.resolution, enable_bucket=ds.enable_bucket, no_upscale=ds.bucket_no_upscale,
            min_size=ds.min_bucket_reso, max_size=ds.max_bucket_reso, steps=ds.bucket_reso_steps,
        )
        train: list[ImageEntry] = []
        reg: list[ImageEntry] = []
        infos: list[tuple[SubsetSpec, int, list[str]]] = []
        for si, sub in enumerate(ds.subsets):
            captions = []
            uncaptioned: list[Path] = []
            for path in _list_images(sub):
                caption, from_file = read_caption(path, sub)
                if not from_file:
                    uncaptioned.append(path)
                w, h = image_size(path)
                choice = selector.select(w, h)
                if choice.reso[0] < 1 or choice.reso[1] < 1:
                    raise DatasetError(
                        f"image {path} ({w}x{h}) is smaller than bucket_reso_steps {ds.bucket_reso_steps} "
                        f"so bucket_no_upscale cannot fit it in a bucket; use a larger image or lower bucket_reso_steps"
                    )
                captions.append(caption)
                (reg if sub.is_reg else train).append(ImageEntry(
                    path=path, caption=caption, is_reg=sub.is_reg, num_repeats=sub.num_repeats,
                    bucket=choice.reso, resized_size=choice.resized_size, image_size=(w, h),
                    shuffle_caption=sub.shuffle_caption, keep_tokens=sub.keep_tokens, flip_aug=sub.flip_aug,
                    caption_from_file=from_file, dataset_index=di, subset_index=si, ar_error=choice.ar_error,
                ))
            infos.append((sub, len(captions), captions))
            if (warning := caption_extension_warning(sub, uncaptioned, len(captions))) is not None:
                warnings.append(warning)
        num_train = sum(e.num_repeats for e in train)
        entries.extend(train)
        entries.extend(_balance_reg(reg, num_train, ds, warnings))
        subset_images.append(infos)
    plan = DatasetPlan(specs, entries, warnings, subset_images)
    if plan.num_train_images == 0:
        raise DatasetError("the dataset has no training images (only regularisation images); add a subset without is_reg")
    return plan


def _balance_reg(reg: list[ImageEntry], num_train: int, ds: DatasetSpec, warnings: list[str]) -> list[ImageEntry]:
    """kohya's reg balancing: register reg images until they match ``num_train``."""
    if not reg:
        return []
    if num_train == 0:
        warnings.append(f"{ds.where}: regularisation images ignored because the dataset has no training images")
        return []
    used: list[ImageEntry] = []
    n = 0
    for e in reg:                      # first pass: whole images with their repeats
        if n >= num_train:
            break
        used.append(e)
        n += e.num_repeats
    while n < num_train:               # short: one more repeat per image, round-robin
        for e in used:
            if n >= num_train:
                break
            e.num_repeats += 1
            n += 1
    if len(used) < len(reg):
        warnings.append(
            f"{ds.where}: {len(reg) - len(used)} of {len(reg)} regularisation images unused "
            f"(kohya uses only as many as the {num_train} training samples)"
        )
    return used


def compute_total_steps(
    batches_per_epoch: int,
    max_train_epochs: int | None,
    max_train_steps: int | None,
    gradient_accumulation_steps: int = 1,
) -> tuple[int, int]:
    """(total optimizer steps, number of epochs), exactly as kohya's train_network.py.

    ``max_train_epochs`` overrides ``max_train_steps``; with neither, kohya's default of
    1600 steps is used. Steps per epoch = ceil(batches / accumulation); epochs =
    ceil(total / steps per epoch).
    """
    if batches_per_epoch < 1:
        raise DatasetError("the dataset yields no batches per epoch; add images")
    if gradient_accumulation_steps < 1:
        raise ConfigError(f"--gradient_accumulation_steps = {gradient_accumulation_steps} must be at least 1")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_train_epochs is not None:
        if max_train_epochs < 1:
            raise ConfigError(f"--max_train_epochs = {max_train_epochs} must be at least 1")
        total = max_train_epochs * steps_per_epoch
    else:
        total = DEFAULT_MAX_TRAIN_STEPS if max_train_steps is None else max_train_steps
        if total < 1:
            raise ConfigError(f"--max_train_steps = {total} must be at least 1")
    return total, math.ceil(total / steps_per_epoch)
