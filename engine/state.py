"""Training state beside a checkpoint: everything needed to continue a run exactly.

A state folder holds the LoRA weights (fp32), optimizer, LR scheduler, every RNG
(python, numpy, torch CPU and device, the engine's own noise generator and data RNG),
and the run's position (global step, epoch, batch index in that epoch's order). It is
written into a temp folder and renamed, so it is complete or absent.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.kohya.names import checkpoint_filename, state_dirname
from engine.errors import CheckpointError, ConfigError, DiskFullError
from engine.io.atomic import TEMP_MARK, aside_original, replace_folder, temp_name

PROGRESS = "progress.json"
STATE_FORMAT = 1
PID_MAX = 4_194_304     # the highest pid Linux can hand out (macOS: 99998): the widest pid in a temp name


@dataclass
class Progress:
    global_step: int
    epoch: int                  # 0-based epoch the next step belongs to
    batch_in_epoch: int         # index of the next batch in that epoch's order
    seed: int
    run_id: str
    config: dict[str, Any]
    lr_scale: float = 1.0       # halved by the rollback NaN policy
    nan_skipped: int = 0
    format: int = STATE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


def longest_written_name(output_name: str, step_digits: int = 8) -> str:
    """The longest file or folder name a run called ``output_name`` writes in its output folder:
    the temp names of a step checkpoint and of a step state, with the widest step and pid."""
    step = 10 ** step_digits - 1
    names = (temp_name(checkpoint_filename(output_name, step=step), pid=PID_MAX),
             temp_name(state_dirname(output_name, step), pid=PID_MAX))
    return max(names, key=lambda n: len(os.fsencode(n)))


def capture_rng(noise_generator, data_rng: random.Random, device_type: str) -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "data": data_rng.getstate(),
    }
    try:
        if device_type == "cuda" and torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        elif device_type == "mps" and torch.backends.mps.is_available():
            state["mps"] = torch.mps.get_rng_state()
    except Exception:  # noqa: BLE001 - a device RNG we cannot read is not worth failing a save
        pass
    return state


def restore_rng(state: dict[str, Any], noise_generator, data_rng: random.Random) -> None:
    import numpy as np
    import torch

    def as_tuple(x):
        return tuple(as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x

    random.setstate(as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    data_rng.setstate(as_tuple(state["data"]))
    try:
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "mps" in state and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])
    except Exception:  # noqa: BLE001
        pass


def save_state(dest: Path, *, lora_tensors: dict, optimizer_state: dict, scheduler_state: dict,
               rng_state: dict, progress: Progress) -> Path:
    """Write the state folder atomically (temp folder + rename). Raises CheckpointError."""
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    for key, tensor in lora_tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"not saving training state {dest}: {key} contains NaN or Inf; training "
                                  "diverged — lower the learning rate or resume from an earlier state")
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in lora_tensors.items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_state, tmp / "rng.pt")
        (tmp / PROGRESS).write_text(json.dumps(asdict(progress), indent=1, default=str))

    try:
        replace_folder(dest, fill)
    except OSError as err:
        error = DiskFullError if err.errno == errno.ENOSPC else CheckpointError
        raise error(f"could not write training state {dest}: {err.strerror or err}") from None
    return dest


@dataclass
class LoadedState:
    path: Path
    progress: Progress
    lora_tensors: dict
    optimizer_state: dict
    scheduler_state: dict
    rng_state: dict


def load_state(path: Path) -> LoadedState:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / PROGRESS).is_file():
        raise ConfigError(f"--resume={path}: not a spyke-cockpit state folder (no {PROGRESS}); "
                          "pass a '*-state' folder written with --save_state, or 'latest'")
    try:
        raw = json.loads((path / PROGRESS).read_text())
        progress = Progress(**{k: v for k, v in raw.items() if k in Progress.__dataclass_fields__})
        return LoadedState(
            path=path,
            progress=progress,
            lora_tensors=load_file(str(path / "lora.safetensors")),
            optimizer_state=torch.load(path / "optimizer.pt", weights_only=True),
            scheduler_state=torch.load(path / "scheduler.pt", weights_only=True),
            rng_state=torch.load(path / "rng.pt", weights_only=True),
        )
    except Exception as err:  # noqa: BLE001 - any corruption is one clear line
        raise ConfigError(f"--resume={path}: the state folder is damaged ({type(err).__name__}: {err}); "
                          "resume from an earlier '*-state' folder") from None


def read_progress(path: Path) -> dict[str, Any] | None:
    """A state folder's progress.json (no torch), or None when it is missing or unreadable."""
    try:
        raw = json.loads((Path(path) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def find_latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The state folder with the highest global step for ``output_name`` in ``output_dir``."""
    best: tuple[int, float, Path] | None = None
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    for child in folder.iterdir():
        if not child.is_dir() or child.name.startswith(".") or not child.name.startswith(output_name):
            continue
        if not child.name.endswith("-state") or not (child / PROGRESS).is_file():
            continue
        try:
            step = int(json.loads((child / PROGRESS).read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            continue
        key = (step, child.stat().st_mtime, child)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def cleanup_temp_dirs(folder: Path) -> list[Path]:
    """Remove state temp folders left by a killed run."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith(".") and TEMP_MARK in child.name:
            # A kill between "move the old state aside" and "move the new one in" leaves only the
            # old one, complete, under its temp name: put it back rather than lose it.
            original_name = aside_original(child.name)
            original = folder / original_name if original_name else None
            if original is not None and not original.exists() and (child / PROGRESS).is_file():
                try:
                    os.rename(child, original)
                    continue
                except OSError:
                    pass
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


# Fields a resumed run may change: where and how often it saves, logs, samples and validates, what it
# does on a NaN or a full disk, which device and data loader it uses, how it resumes. They change neither
# the images trained on nor the math of a step. Every other setting defines the run: a resume that
# changes one is refused unless --resume_force, so a field added later is guarded without being listed.
RESUME_FREE = frozenset({
    # how the run resumes or restarts
    "resume", "resume_force", "initial_step", "initial_epoch", "skip_until_initial_step", "overwrite",
    # where the files go and which ones are kept (output_name stays run-defining: the files are named by it)
    "output_dir", "save_model_as", "save_every_n_steps", "save_every_n_epochs", "save_precision", "save_state",
    "save_state_on_train_end", "save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state",
    "save_last_n_epochs_state", "save_n_epoch_ratio", "training_comment", "no_metadata",
    "metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
    "metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from", "metadata_trigger_phrase",
    "metadata_preprocessor", "metadata_is_negative_embedding",
    # watching the run: logs, trackers, samples, validation, notifications
    "logging_dir", "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "wandb_run_name",
    "wandb_api_key", "log_config", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
    "sample_at_first", "sample_sampler", "validate_every_n_steps", "validate_every_n_epochs",
    "max_validation_steps", "no_notify",
    # guards and the machine: same math on another device, loader or memory layout
    "nan_policy", "device", "ignore_memory_check", "no_prevent_sleep", "gradient_checkpointing",
    "no_half_vae", "cache_latents", "cache_latents_to_disk", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "allow_pickle", "sd_config_dir",
    # the start only: on a resume the network comes from the state folder
    "network_weights", "dim_from_weights",
})


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The run-defining settings (every field outside :data:`RESUME_FREE`) that differ between the saved
    run and this one; a field the saved run did not know (an older version's state) is not compared."""
    out = []
    for name, now in current.items():
        if name in RESUME_FREE or name not in saved:
            continue
        if saved[name] != now:   # to_dict gives lists, as the saved JSON has them
            out.append(f"{name}: saved {saved[name]!r}, now {now!r}")
    return out
