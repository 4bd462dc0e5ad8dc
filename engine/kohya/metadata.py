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
# kohya's SS_METADATA_MINIMUM_KEYS: all that --no_metadata keeps of the ss_ block (the modelspec block stays).
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
# Kept under --no_metadata too: they only say which run wrote the file at which step (a random id and a
# number), and the run needs them to recognise its own files (resume, --save_last_n_* pruning).
OWNERSHIP_KEYS = ("ss_session_id", "ss_steps")
# library/sai_model_spec.py for an SD1 LoRA: implementation is "diffusers" (only
# SDXL LoRAs, full checkpoints and TIs get the Stability-AI generative-models URL).
# kohya writes ModelSpec 1.0.1 with implementation_version "sd-scripts/<commit>"; ours names this program.
MODELSPEC_SPEC_VERSION = "1.0.1"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"
MODELSPEC_IMPLEMENTATION = "diffusers"
MODELSPEC_DEFAULT_RESOLUTION = 512
# kohya's --metadata_<key> flags of train_network.py besides --metadata_title (sai_model_spec.add_model_spec_arguments).
MODELSPEC_FLAGS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                   "trigger_phrase", "preprocessor", "is_negative_embedding")


def implementation_version() -> str:
    """``modelspec.implementation_version``: ``spyke-cockpit/<version>`` (kohya: ``sd-scripts/<commit>``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"spyke-cockpit/{version('spyke-cockpit')}"
    except PackageNotFoundError:
        return "spyke-cockpit/unknown"


def thumbnail_data_url(value: str) -> str:
    """kohya's --metadata_thumbnail: a data: URL as given, a file as ``data:<mime>;base64,<bytes>``
    (the mime type from the file name, application/octet-stream when unknown)."""
    import base64
    import mimetypes

    if value.startswith("data:"):
        return value
    path = Path(value).expanduser()
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def modelspec_inputs(cfg) -> dict[str, object]:
    """The config's --metadata_* values, keyed as :func:`build_metadata` reads them (thumbnail as a data: URL)."""
    out: dict[str, object] = {}
    for key in ("title",) + MODELSPEC_FLAGS:
        value = getattr(cfg, f"metadata_{key}", None)
        if value is not None:
            out[f"metadata_{key}"] = thumbnail_data_url(value) if key == "thumbnail" and value else value
    return out


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
    if values.get("network_module"):   # kohya: ss_network_module is --network_module
        meta["ss_network_module"] = str(values["network_module"])
    if values.get("base_model_version"):
        meta["ss_base_model_version"] = str(values["base_model_version"])   # sd_v1_v for v-prediction

    # ---- modelspec (kohya sai_model_spec for an SD1 LoRA)
    started = values.get("training_started_at")
    try:
        ts = float(started) if started is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ts = None
    if ts is None or not math.isfinite(ts):
        ts = datetime.datetime.now().timestamp()
    title = values.get("metadata_title")
    if title is None:
        title = values.get("output_name") or f"LoRA@{ts}"
    reso = _parse_resolution(values.get("resolution")) or (MODELSPEC_DEFAULT_RESOLUTION,) * 2
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.implementation_version": implementation_version(),
        "modelspec.title": str(title),
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    clip_skip = values.get("clip_skip")
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    for key in MODELSPEC_FLAGS:       # kohya: each --metadata_<key> given becomes modelspec.<key>, as given
        if values.get(f"metadata_{key}") is not None:
            spec[f"modelspec.{key}"] = str(values[f"metadata_{key}"])
    for key, value in spec.items():
        meta.setdefault(key, value)
    return meta


def _network_args(cfg) -> dict:
    """kohya's ``ss_network_args``: the ``--network_args`` as the dict it passed on (for lycoris.kohya with
    kohya's ``dropout`` = --network_dropout added unless given)."""
    if cfg.network_module == "lycoris.kohya":
        from engine.lycoris_args import lycoris_kwargs

        return lycoris_kwargs(cfg.network_args, cfg.network_dropout)
    from engine.network_args import split_items

    return split_items(cfg.network_args)


def run_metadata(cfg, plan, base, *, run_id: str, started_at: float, seed: int, step: int,
                 epoch: int, optimizer: str = "torch.optim.adamw.AdamW") -> dict[str, str]:
    """The metadata of one checkpoint of a run: the config's and plan's facts kohya records, the
    base model's name and hashes, the dataset block, and where the run stands (``step``, ``epoch``).
    ``cfg`` is a TrainConfig, ``plan`` a RunPlan, ``base`` a loaded BaseModel; ``optimizer`` is kohya's
    ``module.Class(args)`` spelling of the optimizer that trains."""
    from engine.kohya.dataset_metadata import dataset_metadata

    meta = build_metadata({
        "session_id": run_id,
        "training_comment": cfg.training_comment or None,
        "training_started_at": started_at,
        "training_finished_at": time.time(),
        "output_name": cfg.output_name,
        "sd_model_name": base.model_name,
        "new_sd_model_hash": base.sha256() or "",
        "network_dim": cfg.network_dim,
        "network_alpha": cfg.network_alpha,
        "network_dropout": cfg.network_dropout,
        "network_module": cfg.network_module,
        # kohya turns the flag off (False) for a network without max-norm support (networks.dylora)
        "scale_weight_norms": (False if cfg.scale_weight_norms and cfg.network_module == "networks.dylora"
                               else cfg.scale_weight_norms),
        **({"network_args": _network_args(cfg)} if cfg.network_args else {}),
        "learning_rate": cfg.learning_rate,
        "unet_lr": cfg.unet_lr,
        "text_encoder_lr": cfg.text_encoder_lr,
        "lr_scheduler": cfg.lr_scheduler,
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "optimizer": optimizer,
        "max_grad_norm": cfg.max_grad_norm,
        "resize_interpolation": cfg.resize_interpolation,
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
        "fp8_base": cfg.fp8_base,
        "fp8_base_unet": cfg.fp8_base_unet,
        "save_precision": cfg.save_precision,
        "clip_skip": cfg.clip_skip,
        "max_token_length": cfg.max_token_length,
        "seed": seed,
        "cache_latents": cfg.cache_latents,
        "prior_loss_weight": cfg.prior_loss_weight,
        "noise_offset": cfg.noise_offset,
        "min_snr_gamma": cfg.min_snr_gamma,
        **loss_metadata(cfg),
        **modelspec_inputs(cfg),
        **dataset_metadata(plan.dataset, from_dataset_config=bool(cfg.dataset_config),
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps),
        **({"sd_model_hash": legacy} if (legacy := base.legacy_hash()) else {}),
    })
    return minimal_metadata(meta) if cfg.no_metadata else meta


def loss_metadata(cfg) -> dict[str, object]:
    """kohya's ``ss_*`` keys of the loss and noise options (written whether or not they are on), the
    model version and prediction type of v-prediction, and the timestep range when one is given."""
    out: dict[str, object] = {
        "multires_noise_iterations": cfg.multires_noise_iterations,
        "multires_noise_discount": cfg.multires_noise_discount,
        "adaptive_noise_scale": cfg.adaptive_noise_scale,
        "zero_terminal_snr": cfg.zero_terminal_snr,
        "ip_noise_gamma": cfg.ip_noise_gamma,
        "debiased_estimation": bool(cfg.debiased_estimation_loss),
        "noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "loss_type": cfg.loss_type,
        "huber_schedule": cfg.huber_schedule,
        "huber_scale": cfg.huber_scale,
        "huber_c": cfg.huber_c,
    }
    if cfg.v_parameterization:
        out["base_model_version"] = "sd_v1_v"
        out["modelspec.prediction_type"] = "v"
    if cfg.min_timestep is not None or cfg.max_timestep is not None:
        low = 0 if cfg.min_timestep is None else cfg.min_timestep
        high = 1000 if cfg.max_timestep is None else cfg.max_timestep
        out["modelspec.timestep_range"] = f"{low},{high}"
    return out


def minimal_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``--no_metadata``: the minimum ss_ keys and the modelspec block, plus the run-ownership keys."""
    return {k: v for k, v in meta.items()
            if k in MINIMUM_KEYS or k in OWNERSHIP_KEYS or k.startswith("modelspec.")}
