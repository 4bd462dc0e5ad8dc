"""The dataset layer: images, captions, repeats, buckets and batches (kohya semantics).

``load_dataset_plan(DatasetArgs)`` scans everything up front (image headers, caption
files, buckets) and raises one-line ``DatasetError``s; the returned ``DatasetPlan``
then serves deterministic epoch orders and decoded batches.

Kohya parity notes (train_util.py / config_util.py):

* Captions (``engine.captions``): ``<image stem><caption_extension>`` read as UTF-8 (a BOM
  is dropped), first line, stripped. No caption file → the subset's ``class_tokens``;
  neither → an empty caption with one plan warning per subset (kohya trains it so). A
  caption file whose first line is blank is an empty caption (one plan warning per subset);
  one without a line is an error (kohya asserts). Images that fall back while a
  .txt/.caption/.tags file sits beside them train so too, with one plan warning per subset
  naming the flag to set. A subset with ``metadata_file`` takes captions from kohya's fine-tuning
  metadata instead (``engine.finetune_metadata``).
* Regularisation images are balanced per dataset like kohya's DreamBoothDataset: reg
  images are registered in order with their repeats until they reach the dataset's
  train count; if they fall short, repeats are added one image at a time, round-robin.
  Reg images that are not needed are left out of ``entries`` (with a warning).
* Sample ids are repeat-expanded: entry ``i`` owns ids
  ``sample_offsets[i] .. sample_offsets[i] + entries[i].num_repeats - 1``.
* Each dataset has its own buckets and batch size (kohya's DatasetGroup); an epoch's
  batches never mix buckets or datasets.
* Per sample, ``load_batch`` draws from the run's data RNG in kohya's order: flip, crop
  (``random_crop``; ``face_crop_aug_range`` without bucketing), ``color_aug``, then the
  caption (``engine.captions.process_caption``: dropout, wildcards, shuffle, tag dropout).
* ``num_reg_images`` is kohya's count before balancing (reg images x their repeats).
* Pixels come from ``engine.images`` (every Pillow mode to 8-bit RGB, EXIF-upright; the
  bucket is chosen for the upright size). See ``to_rgb8`` for where that departs from kohya.

Its length is the plan and its kohya parity notes beside the code they describe; captions,
augmentation, images and the latent cache are their own modules.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.augment import color_aug, crop_offsets, face_check, face_crop, face_from_name
from engine.buckets import BucketSelector, resize_and_crop, resize_only
from engine.captions import (caption_extension_warning, empty_captions_warning, missing_captions_warning,
                             process_caption, read_caption)
from engine.dataset_split import split_train_val
from engine.dataset_config import DatasetArgs, DatasetSpec, SubsetSpec
from engine.dataset_sources import resolve_dataset_specs
from engine.errors import ConfigError, DatasetError
from engine.finetune_metadata import read_finetune_metadata
from engine.images import image_size, load_rgb8
from engine.masks import attach_masks

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
    face: tuple[int, int, int, int] | None = None   # face (cx, cy, w, h) from the name, for face_crop_aug_range


@dataclass
class Batch:
    pixel_values: "torch.Tensor"       # float32 [B, 3, H, W] in [-1, 1]
    captions: list[str]                # after shuffle_caption / keep_tokens
    is_reg: "torch.Tensor"             # bool [B]
    flipped: list[bool]
    entry_indices: list[int]
    sample_ids: list[int]
    bucket: tuple[int, int]            # (width, height)
    masks: "torch.Tensor | None" = None   # float32 [B, H, W] loss masks in [0, 1] (engine.masks), or None


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
        self._resized: dict[int, object] = {}
        self.cache_images = True
        self.args: DatasetArgs | None = None
        self.max_train_steps = 0          # set by the run plan (kohya set_max_train_steps): token_warmup_step ratios
        self.validation: DatasetPlan | None = None   # the held-out images (validation_split), never trained on
        self.masks = None                 # engine.masks.LossMasks when a subset has alpha_mask / conditioning_data_dir

    def validation_batches(self) -> list[list[int]]:
        """The batches of a validation pass, always in the same order: per dataset, its buckets in
        order, each bucket's sample ids in order, cut into the dataset's batch size."""
        out: list[list[int]] = []
        for ds, buckets in zip(self.datasets, self.dataset_buckets):
            for _, ids in buckets:
                out.extend(list(ids[i:i + ds.batch_size]) for i in range(0, len(ids), ds.batch_size))
        return out

    def subset_of(self, entry_index: int) -> SubsetSpec:
        e = self.entries[entry_index]
        return self.datasets[e.dataset_index].subsets[e.subset_index]

    def set_max_train_steps(self, steps: int) -> None:
        self.max_train_steps = int(steps)

    def augments(self, entry_index: int) -> bool:
        """Whether an entry's pixels change from draw to draw (random_crop, color_aug or a face crop)."""
        sub = self.subset_of(entry_index)
        return bool(sub.color_aug or sub.random_crop or self._face_crops(entry_index))

    def resize_method(self, entry_index: int) -> str:
        """How the entry's image is resized to its ``resized_size`` (``engine.resize.method``); "" when it is not."""
        from engine.resize import method

        e = self.entries[entry_index]
        if tuple(e.image_size) == tuple(e.resized_size):
            return ""
        return method(self.subset_of(entry_index).resize_interpolation, e.image_size, e.resized_size)

    def _face_crops(self, entry_index: int) -> bool:
        e = self.entries[entry_index]
        return e.face is not None and not self.datasets[e.dataset_index].enable_bucket

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
    def _decoded(self, entry_index: int):
        e = self.entries[entry_index]
        im = load_rgb8(e.path)
        if im.size != e.image_size:
            raise DatasetError(f"image {e.path} changed size since the dataset was scanned; restart the run")
        return im

    def _array(self, entry_index: int) -> np.ndarray:
        """The entry's pixels resized and centre-cropped to its bucket (no random augmentation)."""
        arr = self._cache.get(entry_index)
        if arr is not None:
            return arr
        e = self.entries[entry_index]
        arr = resize_and_crop(self._decoded(entry_index), e.bucket, e.resized_size,
                              self.subset_of(entry_index).resize_interpolation)
        if self.cache_images:
            self._cache[entry_index] = arr
        return arr

    def _augmented(self, entry_index: int, rng: random.Random) -> np.ndarray:
        """Pixels with the subset's random crop / face crop, then color_aug, drawing from ``rng``."""
        e = self.entries[entry_index]
        sub = self.subset_of(entry_index)
        if self._face_crops(entry_index):
            ds = self.datasets[e.dataset_index]
            arr = face_crop(self._source(entry_index, resized=False), e.face, ds.resolution,
                            sub.face_crop_aug_range, sub.random_crop, rng, sub.resize_interpolation)
        elif sub.random_crop:
            arr = self._source(entry_index, resized=True)
            left, top = crop_offsets((arr.shape[1], arr.shape[0]), e.bucket, True, rng)
            arr = arr[top:top + e.bucket[1], left:left + e.bucket[0]]
        else:
            arr = self._array(entry_index)
        if sub.color_aug:
            arr = color_aug(arr, rng)
        return arr

    def _source(self, entry_index: int, *, resized: bool):
        """The decoded image (PIL) for a face crop, or its resized uint8 array for a random crop; kept in memory."""
        got = self._resized.get(entry_index)
        if got is None:
            e = self.entries[entry_index]
            im = self._decoded(entry_index)
            got = resize_only(im, e.resized_size, self.subset_of(entry_index).resize_interpolation) if resized else im
            if self.cache_images:
                self._resized[entry_index] = got
        return got

    @staticmethod
    def _tensor(arr: np.ndarray, flip: bool) -> "torch.Tensor":
        import torch

        if flip:
            arr = arr[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        return t.div_(127.5).sub_(1.0)

    def load_image(self, entry_index: int, flip: bool = False) -> "torch.Tensor":
        """[3, H, W] float32 in [-1, 1], resized and center-cropped to the entry's bucket, without the random
        augmentations (what latent caching encodes; kohya refuses caching with color_aug/random_crop)."""
        return self._tensor(self._array(entry_index), flip)

    def load_batch(self, batch: list[int], rng: random.Random, *, epoch: int | None = None,
                   step: int | None = None) -> Batch:
        """Decode one batch of sample ids (all from one bucket). Per sample, in kohya's order:
        flip (if the subset has flip_aug: ``rng.random() < 0.5``), the crop and color_aug draws,
        then the caption's. ``epoch`` (1-based) and ``step`` (optimizer steps done) feed
        ``caption_dropout_every_n_epochs`` and ``token_warmup_step``.
        """
        import torch

        if not batch:
            raise ValueError("load_batch: empty batch")
        entry_indices = [self.sample_to_entry(s) for s in batch]
        bucket = self.entries[entry_indices[0]].bucket
        images, captions, flipped, states = [], [], [], []
        for ei in entry_indices:
            e = self.entries[ei]
            if e.bucket != bucket:
                raise ValueError(f"load_batch: samples from buckets {bucket} and {e.bucket} cannot share a batch")
            flip = bool(e.flip_aug and rng.random() < 0.5)
            states.append(rng.getstate() if self.masks is not None else None)   # the mask replays the crop
            arr = self._augmented(ei, rng) if self.augments(ei) else self._array(ei)
            images.append(self._tensor(arr, flip))
            captions.append(process_caption(e.caption, self.subset_of(ei), rng, epoch=epoch, step=step,
                                            max_train_steps=self.max_train_steps))
            flipped.append(flip)
        return Batch(
            pixel_values=torch.stack(images),
            captions=captions,
            is_reg=torch.tensor([self.entries[ei].is_reg for ei in entry_indices], dtype=torch.bool),
            flipped=flipped,
            entry_indices=entry_indices,
            sample_ids=list(batch),
            bucket=bucket,
            masks=self.masks.batch(entry_indices, flipped, states) if self.masks is not None else None,
        )


def load_dataset_plan(args: DatasetArgs) -> DatasetPlan:
    """Scan images, captions and buckets for ``args``; raises ``DatasetError``."""
    warnings: list[str] = []
    specs = resolve_dataset_specs(args, warnings)
    entries: list[ImageEntry] = []
    held_out: list[ImageEntry] = []
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
            held: list = []
            captions = []
            uncaptioned: list[Path] = []
            empty_files: list[Path] = []
            if sub.metadata_file is not None:
                listed = read_finetune_metadata(sub, IMAGE_EXTENSIONS)
            else:
                listed = [(path, *read_caption(path, sub)) for path in _list_images(sub)]
            if ds.validation_split > 0 and not sub.is_reg:
                listed, held = split_train_val(listed, ds.validation_split, ds.validation_seed)
            for n, (path, caption, from_file) in enumerate(listed + held):
                is_held = n >= len(listed)
                if not from_file and not is_held:
                    uncaptioned.append(path)
                elif from_file and not caption:
                    empty_files.append(path)
                w, h = image_size(path)
                face = face_from_name(path) if sub.face_crop_aug_range is not None else None
                if face is not None and not ds.enable_bucket:
                    face_check(path, (w, h), ds.resolution)
                choice = selector.select(w, h)
                if choice.reso[0] < 1 or choice.reso[1] < 1:
                    raise DatasetError(
                        f"image {path} ({w}x{h}) is smaller than bucket_reso_steps {ds.bucket_reso_steps} "
                        f"so bucket_no_upscale cannot fit it in a bucket; use a larger image or lower bucket_reso_steps"
                    )
                if not is_held:
                    captions.append(caption)
                (held_out if is_held else reg if sub.is_reg else train).append(ImageEntry(
                    path=path, caption=caption, is_reg=sub.is_reg, num_repeats=1 if is_held else sub.num_repeats,
                    bucket=choice.reso, resized_size=choice.resized_size, image_size=(w, h),
                    shuffle_caption=sub.shuffle_caption, keep_tokens=sub.keep_tokens, flip_aug=sub.flip_aug,
                    caption_from_file=from_file, dataset_index=di, subset_index=si, ar_error=choice.ar_error,
                    face=face,
                ))
            infos.append((sub, len(captions), captions))
            if sub.metadata_file is not None:
                continue
            warning = caption_extension_warning(sub, uncaptioned, len(captions))
            if warning is None:
                warning = missing_captions_warning(sub, [p for p in uncaptioned])
            if warning is not None:
                warnings.append(warning)
            if (warning := empty_captions_warning(sub, empty_files)) is not None:
                warnings.append(warning)
        num_train = sum(e.num_repeats for e in train)
        entries.extend(train)
        entries.extend(_balance_reg(reg, num_train, ds, warnings))
        subset_images.append(infos)
    plan = DatasetPlan(specs, entries, warnings, subset_images)
    plan.args = args
    if plan.num_train_images == 0:
        raise DatasetError("the dataset has no training images (only regularisation images); add a subset without is_reg")
    if held_out:
        plan.validation = DatasetPlan(specs, held_out, [], [[] for _ in specs])
    elif any(ds.validation_split > 0 for ds in specs):
        warnings.append("validation_split holds out no image (each subset keeps ceil(n * (1 - split)) of its n "
                        "images); raise validation_split or add images to get a validation loss")
    attach_masks(plan, args.masked_loss, IMAGE_EXTENSIONS)
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
