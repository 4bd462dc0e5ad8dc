"""Validation of the run's configuration: every invalid field of a :class:`TrainConfig` with a one-line
reason, and the first of them as a ConfigError (``TrainConfig.problems()`` / ``validate()`` call these)."""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path

from engine.config import AWAITING_TRAINING_SETUP, FP32_MAX, TrainConfig, field_default
from engine.errors import ConfigError
from engine.optimizers import optimizer_type_problem, resolve_type


def config_problems(cfg: TrainConfig) -> dict[str, str]:
    """Every invalid field with a one-line reason (empty when the config is valid)."""
    out: dict[str, str] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        meta = f.metadata
        if meta.get("choices") and value is not None and value not in meta["choices"]:
            out[f.name] = f"must be one of {', '.join(meta['choices'])} (got {value!r})"
        if isinstance(value, float) and (not math.isfinite(value) or abs(value) > FP32_MAX):
            out[f.name] = f"must be a finite number within float32 range (got {value!r})"
            continue
        minimum = meta.get("minimum")
        if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < minimum or (isinstance(value, float) and not math.isfinite(value)):
                out[f.name] = f"must be ≥ {minimum:g} (got {value!r})"
    if not cfg.pretrained_model_name_or_path:
        out["pretrained_model_name_or_path"] = "is required: a diffusers folder or an SD1.x .safetensors"
    if not cfg.dataset_config and not cfg.train_data_dir:
        out["dataset_config"] = "give --dataset_config=<dataset.toml> or --train_data_dir=<folder>"
    try:
        cfg.resolution_wh()
    except ConfigError as err:
        out["resolution"] = str(err).split(": ", 1)[-1]
    if not cfg.output_name.strip() or any(c in cfg.output_name for c in "/\\"):
        out["output_name"] = "must be a plain file name without slashes"
    elif (too_long := _output_name_too_long(cfg)) is not None:
        out["output_name"] = too_long
    if (why := optimizer_type_problem(cfg.optimizer_type)) is not None:
        out["optimizer_type"] = why
    try:
        resolve_type(cfg.optimizer_type, cfg.use_8bit_adam, cfg.use_lion_optimizer)
    except ConfigError as err:
        out.setdefault("use_8bit_adam" if cfg.use_8bit_adam else "use_lion_optimizer", str(err).split(" ", 1)[1])
    if cfg.full_fp16 and cfg.full_bf16:
        out["full_bf16"] = "cannot be combined with full_fp16"
    for name, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(cfg, name) and cfg.mixed_precision != dtype:
            out[name] = f"needs --mixed_precision={dtype}, as in kohya (got {cfg.mixed_precision})"
    for name in ("fp8_base", "fp8_base_unet"):
        if getattr(cfg, name) and cfg.mixed_precision == "no":
            out[name] = ("needs --mixed_precision=fp16 or bf16, as in kohya: the float8 weights compute under "
                         "autocast")
            break
    for name in AWAITING_TRAINING_SETUP:
        if getattr(cfg, name) != field_default(name):
            out.setdefault(name, "is parsed but the training setup does not apply it yet; remove it for now")
    out.update({k: v for k, v in _network_problems(cfg).items() if k not in out or k == "network_module"})
    if cfg.metadata_thumbnail and not cfg.metadata_thumbnail.startswith("data:") \
            and not Path(cfg.metadata_thumbnail).expanduser().is_file():
        out["metadata_thumbnail"] = (f"{cfg.metadata_thumbnail} is not a file; give an image file or a "
                                     "data: URL")
    if cfg.base_weights:
        from engine.base_weights import path_problem

        if why := path_problem(cfg.base_weights):
            out["base_weights"] = why
    if cfg.dim_from_weights and not cfg.network_weights:
        out["dim_from_weights"] = "needs --network_weights=<a LoRA file> to read network_dim/alpha from"
    if cfg.max_token_length not in (None, 75, 150, 225):
        out["max_token_length"] = f"must be 75, 150 or 225, kohya's choices (got {cfg.max_token_length!r})"
    if cfg.validation_split >= 1:
        out["validation_split"] = f"must be below 1: it is the fraction held out, e.g. 0.1 (got {cfg.validation_split!r})"
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        out["network_train_text_encoder_only"] = "cannot be combined with network_train_unet_only"
    out.update({k: v for k, v in _sample_problems(cfg).items() if k not in out})
    from engine.tracker_config import logging_problems

    out.update({k: v for k, v in logging_problems(cfg).items() if k not in out})
    from engine.loss_config import loss_problems

    out.update({k: v for k, v in loss_problems(cfg).items() if k not in out})
    return out


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Raise a one-line ConfigError for the first problem; return cfg when valid."""
    problems = cfg.problems()
    if problems:
        name, why = next(iter(problems.items()))
        raise ConfigError(f"--{name} {why}")
    return cfg


def _sample_problems(cfg: TrainConfig) -> dict[str, str]:
    """The sample_* fields: a prompts file kohya can read, and one whenever sampling is asked for."""
    from engine.sample.prompts import check_prompts_path

    out: dict[str, str] = {}
    if cfg.sample_prompts:
        try:
            check_prompts_path(cfg.sample_prompts)
        except ConfigError as err:
            out["sample_prompts"] = str(err).split(": ", 1)[-1]
        return out
    for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
        if getattr(cfg, name):
            out[name] = "needs --sample_prompts=<prompts.txt|.toml|.json> (the prompts to draw)"
            break
    return out


def _network_problems(cfg: TrainConfig) -> dict[str, str]:
    from engine.network_args import parse_network_args, unsupported_module

    out: dict[str, str] = {}
    if why := unsupported_module(cfg.network_module):
        out["network_module"] = why
    if cfg.network_dropout is not None and not 0 <= cfg.network_dropout < 1:
        out["network_dropout"] = f"must be a probability in [0, 1) (got {cfg.network_dropout!r})"
    if cfg.network_module in ("networks.lora", "networks.dylora", "lycoris.kohya"):  # else: refused by its own check
        try:
            if cfg.network_module == "lycoris.kohya":
                from engine.lycoris_args import check_lycoris_args

                check_lycoris_args(cfg.network_args)
            else:
                parse_network_args(cfg.network_args, cfg.network_module, dim=cfg.network_dim,
                                   alpha=cfg.network_alpha)
        except ConfigError as err:
            out["network_args"] = str(err).split(": ", 1)[1]
        if cfg.network_module == "lycoris.kohya" and cfg.dim_from_weights:
            out["dim_from_weights"] = ("is not supported with lycoris.kohya; give --network_dim/--network_alpha "
                                       "(and --network_args) of the file's run")
    return out


def name_max(folder: str | Path) -> int:
    """The longest name, in bytes, the file system of ``folder`` (or its nearest existing parent) allows."""
    probe = Path(folder or ".").expanduser().absolute()
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
    return limit if limit > 0 else 255


def _output_name_too_long(cfg: TrainConfig) -> str | None:
    """Why ``output_name`` cannot fit once the run adds its step suffix and temp-file marks (None if it fits)."""
    from engine.state import longest_written_name

    digits = max(8, len(str(cfg.max_train_steps))) if cfg.max_train_epochs is None else 8
    try:
        longest = len(os.fsencode(longest_written_name(cfg.output_name, digits)))
    except (ConfigError, ValueError):
        return None  # not a plain file name: reported by checkpoint_filename where it is used
    size = len(os.fsencode(cfg.output_name))
    limit = name_max(cfg.output_dir)
    if longest <= limit:
        return None
    extra = longest - size
    unit = "characters" if cfg.output_name.isascii() else "bytes in UTF-8"
    return (f"is {size} {unit} long; use at most {max(limit - extra, 0)}: the run writes names up to {extra} "
            f"longer (.NAME-step{'N' * digits}.safetensors.tmp-PID-RAND) and the file system of "
            f"{cfg.output_dir or '.'} allows {limit}")
