"""kohya's LoRA metadata: the ``ss_*`` training facts and the ``modelspec.*`` block, as strings."""

from __future__ import annotations

import datetime
import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path

# Metadata kohya's train_network.py always writes for an SD1 networks.lora run.
FIXED_METADATA = {
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_network_module": "networks.lora",
}
# library/sai_model_spec.py for an SD1 LoRA: implementation is "diffusers" (only
# SDXL LoRAs, full checkpoints and TIs get the Stability-AI generative-models URL).
MODELSPEC_SPEC_VERSION = "1.0.0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"
MODELSPEC_IMPLEMENTATION = "diffusers"
MODELSPEC_DEFAULT_RESOLUTION = 512


def _meta_str(value: object) -> str:
    """Format a value as kohya does: ``str(v)`` (so None -> "None", True -> "True",
    floats as Python prints them, tuples as "(512, 512)"); dicts/lists as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _parse_resolution(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x ()]+", value) if p]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            return None
    else:
        try:
            nums = [int(v) for v in value]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return None
    if len(nums) == 1:
        return (nums[0], nums[0])
    if len(nums) >= 2:
        return (nums[0], nums[1])
    return None


def build_metadata(values: Mapping[str, object]) -> dict[str, str]:
    """kohya's LoRA metadata: ``ss_*`` training facts plus the ``modelspec.*`` block.

    ``values`` is keyed by the ``ss_`` suffix (``"network_dim"`` -> ``ss_network_dim``);
    keys already starting with ``ss_``, ``sshs_`` or ``modelspec.`` are taken as-is.
    Every value becomes a string the way kohya writes it (``str(v)``; dicts and lists
    as JSON; ``resolution`` (w, h) as ``"(w, h)"``). ``modelspec.*`` is derived like
    kohya's ``sai_model_spec.build_metadata`` for an SD1 LoRA: title = output_name,
    resolution ``WxH`` (512x512 when unknown), date from ``training_started_at``
    (epoch seconds, local time, no microseconds), ``encoder_layer`` = clip_skip when set.
    """
    meta: dict[str, str] = {}
    for key, value in values.items():
        if key.startswith("metadata_"):
            continue  # modelspec inputs (kohya --metadata_title etc.), not ss_ facts
        if key.startswith(("ss_", "sshs_", "modelspec.")):
            full = key
        else:
            full = "ss_" + key
        if full == "ss_resolution":
            reso = _parse_resolution(value)
            meta[full] = str(reso) if reso is not None else _meta_str(value)
            continue
        meta[full] = _meta_str(value)
    meta.update(FIXED_METADATA)

    # ---- modelspec (kohya sai_model_spec for an SD1 LoRA)
    started = values.get("training_started_at")
    try:
        ts = float(started) if started is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ts = None
    if ts is None or not math.isfinite(ts):
        ts = datetime.datetime.now().timestamp()
    title = values.get("metadata_title") or values.get("output_name")
    if not title:
        title = f"LoRA@{ts}"
    reso = _parse_resolution(values.get("resolution")) or (MODELSPEC_DEFAULT_RESOLUTION,) * 2
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    clip_skip = values.get("clip_skip")
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    for key in ("author", "description", "license", "tags"):
        if values.get(f"metadata_{key}") is not None:
            spec[f"modelspec.{key}"] = str(values[f"metadata_{key}"])
    for key, value in spec.items():
        meta.setdefault(key, value)
    return meta


def run_metadata(cfg, plan, base, *, run_id: str, started_at: float, seed: int, step: int,
                 epoch: int, optimizer: str = "torch.optim.adamw.AdamW") -> dict[str, str]:
    """The metadata of one checkpoint of a run: the config's and plan's facts kohya records, the
    base model's name and hashes, the dataset block, and where the run stands (``step``, ``epoch``).
    ``cfg`` is a TrainConfig, ``plan`` a RunPlan, ``base`` a loaded BaseModel; ``optimizer`` is kohya's
    ``module.Class(args)`` spelling of the optimizer that trains."""
    from engine.kohya.dataset_metadata import dataset_metadata

    return build_metadata({
        "session_id": run_id,
        "training_started_at": started_at,
        "training_finished_at": time.time(),
        "output_name": cfg.output_name,
        "sd_model_name": base.model_name,
        "new_sd_model_hash": base.sha256() or "",
        "network_dim": cfg.network_dim,
        "network_alpha": cfg.network_alpha,
        "learning_rate": cfg.learning_rate,
        "unet_lr": cfg.unet_lr,
        "text_encoder_lr": cfg.text_encoder_lr,
        "lr_scheduler": cfg.lr_scheduler,
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "optimizer": optimizer,
        "max_grad_norm": cfg.max_grad_norm,
        "num_train_images": plan.dataset.num_train_images,
        "num_reg_images": plan.dataset.num_reg_images,
        "num_validation_images": len(plan.dataset.validation.entries) if plan.dataset.validation else 0,
        "validation_seed": cfg.validation_seed,
        "validation_split": cfg.validation_split,
        "max_validation_steps": cfg.max_validation_steps,
        "validate_every_n_epochs": cfg.validate_every_n_epochs,
        "validate_every_n_steps": cfg.validate_every_n_steps,
        "num_batches_per_epoch": plan.batches_per_epoch,
        "num_epochs": plan.num_epochs,
        "max_train_steps": plan.total_steps,
        "steps": step,
        "epoch": epoch,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "mixed_precision": cfg.mixed_precision,
        "save_precision": cfg.save_precision,
        "clip_skip": cfg.clip_skip,
        "seed": seed,
        "cache_latents": cfg.cache_latents,
        "prior_loss_weight": cfg.prior_loss_weight,
        "noise_offset": cfg.noise_offset,
        "min_snr_gamma": cfg.min_snr_gamma,
        **dataset_metadata(plan.dataset, from_dataset_config=bool(cfg.dataset_config),
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps),
        **({"sd_model_hash": legacy} if (legacy := base.legacy_hash()) else {}),
    })
