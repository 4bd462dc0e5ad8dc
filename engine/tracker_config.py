"""The logging flags as kohya reads them: which trackers, where their folders go, their init options.

kohya (``train_util.prepare_accelerator`` / ``init_trackers``): ``--logging_dir`` alone means TensorBoard;
each launch logs to ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or network_train>``;
``--log_tracker_config`` is a TOML whose ``[tensorboard]`` / ``[wandb]`` tables are the trackers' init
options; ``--log_config`` hands the run's settings to the trackers as their config, without kohya's
sensitive keys. This module is light (no torch, no wandb import): the config model validates with it.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError

DEFAULT_TRACKER_NAME = "network_train"   # kohya's train_network.py default
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"         # kohya's run folder stamp, local time
# SummaryWriter's own options (the log folder is ours): what a [tensorboard] table may set
TENSORBOARD_OPTIONS = ("comment", "purge_step", "max_queue", "flush_secs", "filename_suffix")
WANDB_PIN = "wandb==0.31.0"
# kohya's get_sanitized_config_or_none leaves these out of --log_config (secrets, and paths that would name
# the user's folders); sd_config_dir is spyke-cockpit's own path of the same kind
SENSITIVE_KEYS = ("wandb_api_key", "huggingface_token")
SENSITIVE_PATH_KEYS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
                       "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir", "sd_config_dir")


def destinations(log_with: str | None, logging_dir: str) -> tuple[str, ...]:
    """The trackers a run logs to (kohya: no --log_with but a --logging_dir means TensorBoard)."""
    if log_with is None:
        return ("tensorboard",) if logging_dir else ()
    return {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}.get(log_with, ())


def tracker_name(value: str | None) -> str:
    return value or DEFAULT_TRACKER_NAME


def run_log_dir(logging_dir: str | Path, prefix: str, started_at: float) -> Path:
    """One launch's log folder: ``<logging_dir>/<prefix><timestamp>`` (the tracker's folder goes inside)."""
    return Path(logging_dir) / f"{prefix or ''}{time.strftime(TIMESTAMP_FORMAT, time.localtime(started_at))}"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def load_tracker_config(path: str) -> dict[str, dict[str, Any]]:
    """``--log_tracker_config``: ``{tracker: {option: value}}``, or a one-line ConfigError."""
    where = f"--log_tracker_config={path}"
    from engine.kohya_config import read_toml

    data = read_toml(Path(path), label=where, missing="file not found")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table of init options, e.g. [wandb] then tags = [\"a\"]")
    unknown = sorted(set(data.get("tensorboard", {})) - set(TENSORBOARD_OPTIONS))
    if unknown:
        raise ConfigError(f"{where}: [tensorboard] {unknown[0]} is not a TensorBoard writer option "
                          f"(use {', '.join(TENSORBOARD_OPTIONS)})")
    return data


def logging_problems(cfg: Any) -> dict[str, str]:
    """The logging flags' problems, one line each (``cfg`` is a TrainConfig)."""
    out: dict[str, str] = {}
    chosen = destinations(cfg.log_with, cfg.logging_dir)
    if cfg.log_with in ("tensorboard", "all") and not cfg.logging_dir:
        out["log_with"] = (f"{cfg.log_with} writes TensorBoard logs and needs --logging_dir=DIR "
                           "(kohya: logging_dir is required when log_with is tensorboard)")
    if "wandb" in chosen and not wandb_installed():
        out.setdefault("log_with", f"{cfg.log_with} needs the wandb package, which is not installed: "
                                   f"`pip install {WANDB_PIN}`, or use --log_with tensorboard")
    if cfg.log_tracker_config:
        try:
            load_tracker_config(cfg.log_tracker_config)
        except ConfigError as err:
            out["log_tracker_config"] = f"{cfg.log_tracker_config}: {str(err).split(': ', 1)[1]}"
    return out


def wandb_init_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """wandb.init's options: ``--wandb_run_name`` as the name, then the tracker config's [wandb] table."""
    options: dict[str, Any] = {}
    if cfg.get("wandb_run_name"):
        options["name"] = cfg["wandb_run_name"]
    if cfg.get("log_tracker_config"):
        options.update(load_tracker_config(cfg["log_tracker_config"]).get("wandb", {}))
    return options


def tensorboard_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if not cfg.get("log_tracker_config"):
        return {}
    return dict(load_tracker_config(cfg["log_tracker_config"]).get("tensorboard", {}))


def logged_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``--log_config``: the settings the trackers store (TensorBoard hparams, wandb config), as kohya's
    ``get_sanitized_config_or_none`` makes them: secrets and folder paths left out, lists as their text
    (trackers take only bool, str, float, int and None). None without ``--log_config``."""
    if not cfg.get("log_config"):
        return None
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in SENSITIVE_KEYS or key in SENSITIVE_PATH_KEYS:
            continue
        out[key] = value if value is None or isinstance(value, (bool, str, float, int)) else f"{value}"
    return out
