"""The dataset half of a LoRA's ``ss_*`` metadata, in kohya's two shapes, from the resolved plan.

kohya's ``train_network.py`` writes the dataset facts one of two ways:

* with ``--dataset_config``: ``ss_datasets``, a JSON list with one object per dataset
  (its batch size, resolution, buckets, tag counts and its subsets), plus the merged
  ``ss_tag_frequency`` and ``ss_dataset_dirs``. The flat per-run keys (``ss_resolution``,
  ``ss_batch_size_per_device``, ``ss_total_batch_size``, bucket and caption options,
  ``ss_reg_dataset_dirs``, ``ss_bucket_info``) are left out: each dataset has its own.
* with ``--train_data_dir``: the single dataset as those flat keys.

Every value is what the plan trains on (TOML over CLI, bucket sizes after rounding;
kohya's ``None`` bucket sizes when bucketing is off), never a command-line default.
Caption and augmentation options carry the values trained with (``color_aug``,
``caption_prefix``, ``resize_interpolation``, ...). Each subset also
records its ``caption_extension``, which kohya leaves out; a fine-tuning subset records
``metadata_file`` instead of ``class_tokens``/``is_reg`` (and its dataset ``is_dreambooth`` false).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from engine.dataset import DatasetPlan
from engine.dataset_config import DatasetSpec, SubsetSpec


def _dir_name(sub: SubsetSpec) -> str:
    return sub.metadata_file.name if sub.metadata_file is not None else sub.image_dir.name


def _dirs_metadata(plan: DatasetPlan, reg: bool) -> dict:
    out: dict[str, dict[str, int]] = {}
    for subs in plan.subset_images:
        for s, count, _ in subs:
            if s.is_reg == reg:   # kohya names a fine-tuning subset by its metadata file
                out[_dir_name(s)] = {"n_repeats": s.num_repeats, "img_count": count}
    return out


def dataset_dirs_metadata(plan: DatasetPlan) -> dict:
    """kohya ss_dataset_dirs: {dir name: {"n_repeats", "img_count"}} for training subsets."""
    return _dirs_metadata(plan, reg=False)


def reg_dataset_dirs_metadata(plan: DatasetPlan) -> dict:
    """kohya ss_reg_dataset_dirs: the same for regularisation subsets."""
    return _dirs_metadata(plan, reg=True)


def subset_image_counts(plan: DatasetPlan, dataset_index: int) -> list[tuple[SubsetSpec, int]]:
    """One dataset's subsets with how many images each folder holds (kohya ``img_count``)."""
    return [(s, count) for s, count, _ in plan.subset_images[dataset_index]]


def tag_frequency(plan: DatasetPlan, dataset_index: int | None = None) -> dict:
    """kohya ss_tag_frequency: {dir name: {lower-cased tag: count}} over every subset's captions.

    Within a dataset, subsets sharing a folder name add up; a folder name already
    counted by an earlier dataset is not counted again (kohya). With
    ``dataset_index``: that dataset's own counts (kohya's per-dataset ``tag_frequency``).
    """
    result: dict[str, dict[str, int]] = {}
    chosen = plan.subset_images if dataset_index is None else [plan.subset_images[dataset_index]]
    for subs in chosen:
        mine: dict[str, Counter] = {}
        for s, _, captions in subs:
            name = s.image_dir.name
            if name in result:
                continue
            counter = mine.setdefault(name, Counter())
            for cap in captions:
                for tag in cap.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        counter[tag] += 1
        for name, counter in mine.items():
            result[name] = dict(counter)
    return result


def bucket_info(plan: DatasetPlan, dataset_index: int | None = None) -> dict | None:
    """kohya ss_bucket_info (None when no dataset uses bucketing).

    With ``dataset_index``: that dataset's buckets numbered from 0 in sorted order
    (kohya's per-dataset ``bucket_info``; None when it does not bucket); counts include
    repeats, the mean aspect-ratio error is over images without repeats.
    """
    if dataset_index is None:
        indices = range(len(plan.datasets))
        if not any(ds.enable_bucket for ds in plan.datasets):
            return None
    else:
        indices = [dataset_index]
        if not plan.datasets[dataset_index].enable_bucket:
            return None
    buckets = {}
    i = 0
    for di in indices:
        for reso, ids in plan.dataset_buckets[di]:
            buckets[i] = {"resolution": list(reso), "count": len(ids)}
            i += 1
    errs = [abs(e.ar_error) for e in plan.entries if e.dataset_index in indices]
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errs)) if errs else 0.0}


def _bucket_sizes(ds: DatasetSpec) -> tuple[int | None, int | None]:
    return (ds.min_bucket_reso, ds.max_bucket_reso) if ds.enable_bucket else (None, None)


def _subset(sub: SubsetSpec, img_count: int) -> dict[str, Any]:
    out = {
        "img_count": img_count,
        "num_repeats": sub.num_repeats,
        "color_aug": bool(sub.color_aug),
        "flip_aug": bool(sub.flip_aug),
        "random_crop": bool(sub.random_crop),
        "shuffle_caption": bool(sub.shuffle_caption),
        "keep_tokens": sub.keep_tokens,
        "keep_tokens_separator": sub.keep_tokens_separator,
        "secondary_separator": sub.secondary_separator,
        "enable_wildcard": bool(sub.enable_wildcard),
        "caption_prefix": sub.caption_prefix,
        "caption_suffix": sub.caption_suffix,
        "resize_interpolation": sub.resize_interpolation,
        "image_dir": sub.image_dir.name,
    }
    if sub.metadata_file is not None:
        out["metadata_file"] = sub.metadata_file.name
        return out
    out |= {"class_tokens": sub.class_tokens, "is_reg": bool(sub.is_reg), "caption_extension": sub.caption_extension}
    return out


def _caption_args(plan: DatasetPlan) -> dict[str, Any]:
    """kohya's run-level caption keys (from the flags; the first subset's value without a dataset config)."""
    sub = plan.datasets[0].subsets[0]
    if plan.args is not None and plan.args.dataset_config is not None:   # kohya writes the flags' values
        from engine.dataset_config import _check_type

        sub = plan.args
        rng = sub.face_crop_aug_range and _check_type("range2", sub.face_crop_aug_range, "--", "face_crop_aug_range")
    else:
        rng = sub.face_crop_aug_range
    return {
        "caption_dropout_rate": sub.caption_dropout_rate,
        "caption_dropout_every_n_epochs": sub.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": sub.caption_tag_dropout_rate,
        "face_crop_aug_range": f"({rng[0]}, {rng[1]})" if rng else None,
    }


def _dataset(plan: DatasetPlan, index: int) -> dict[str, Any]:
    ds = plan.datasets[index]
    counts = subset_image_counts(plan, index)
    lo, hi = _bucket_sizes(ds)
    return {
        "is_dreambooth": not any(s.metadata_file is not None for s in ds.subsets),
        "batch_size_per_device": ds.batch_size,
        "num_train_images": sum(s.num_repeats * n for s, n in counts if not s.is_reg),
        "num_reg_images": sum(s.num_repeats * n for s, n in counts if s.is_reg),
        "resolution": list(ds.resolution),
        "enable_bucket": bool(ds.enable_bucket),
        "min_bucket_reso": lo,
        "max_bucket_reso": hi,
        "tag_frequency": tag_frequency(plan, index),
        "bucket_info": bucket_info(plan, index),
        "resize_interpolation": ds.resize_interpolation,
        "subsets": [_subset(s, n) for s, n in counts],
    }


def _merged_dirs(plan: DatasetPlan) -> dict[str, dict[str, int]]:
    """kohya's merged ss_dataset_dirs: training subsets only; a repeated folder name gets " (2)", " (3)"..."""
    out: dict[str, dict[str, int]] = {}
    for index in range(len(plan.datasets)):
        for sub, count in subset_image_counts(plan, index):
            if sub.is_reg:
                continue
            name, n = _dir_name(sub), 2
            while name in out:
                name, n = f"{_dir_name(sub)} ({n})", n + 1
            out[name] = {"n_repeats": sub.num_repeats, "img_count": count}
    return out


def dataset_metadata(plan: DatasetPlan, *, from_dataset_config: bool,
                     gradient_accumulation_steps: int) -> dict[str, Any]:
    """The dataset keys for ``engine.kohya.metadata.build_metadata`` (``ss_`` prefix left off), plus
    ``modelspec.resolution`` from the first dataset."""
    first = plan.datasets[0]
    modelspec = {"modelspec.resolution": f"{first.resolution[0]}x{first.resolution[1]}"}
    if from_dataset_config:
        return {
            "datasets": [_dataset(plan, i) for i in range(len(plan.datasets))],
            "tag_frequency": tag_frequency(plan),
            "dataset_dirs": _merged_dirs(plan),
            **_caption_args(plan),
            **modelspec,
        }
    sub = first.subsets[0]
    lo, hi = _bucket_sizes(first)
    return {
        "batch_size_per_device": first.batch_size,
        "total_batch_size": first.batch_size * gradient_accumulation_steps,
        "resolution": first.resolution,
        "color_aug": bool(sub.color_aug),
        "flip_aug": bool(sub.flip_aug),
        "random_crop": bool(sub.random_crop),
        "shuffle_caption": bool(sub.shuffle_caption),
        "enable_bucket": bool(first.enable_bucket),
        "bucket_no_upscale": bool(first.enable_bucket and first.bucket_no_upscale),
        "min_bucket_reso": lo,
        "max_bucket_reso": hi,
        "keep_tokens": sub.keep_tokens,
        "caption_extension": sub.caption_extension,
        "dataset_dirs": dataset_dirs_metadata(plan),
        "reg_dataset_dirs": reg_dataset_dirs_metadata(plan),
        "tag_frequency": tag_frequency(plan),
        "bucket_info": json.dumps(bucket_info(plan)),  # "null" without buckets, as kohya writes it
        **_caption_args(plan),
        **modelspec,
    }
