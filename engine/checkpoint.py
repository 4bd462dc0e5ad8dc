"""kohya-format LoRA files: names, ss_*/modelspec metadata, atomic verified saves.

A save never leaves a half-written ``.safetensors`` where a finished one is expected:
the bytes go to ``.{name}.tmp-<pid>-<rand>`` in the same folder, are fsynced, read
back and checked, and only then ``os.replace``d into place (and the folder fsynced).
"""

from __future__ import annotations

import datetime
import errno as errno_mod
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import CheckpointError, ConfigError
from engine.io.atomic import is_temp_name, write_file

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

SUPPORTED_SAVE_FORMATS = ("safetensors",)
# kohya's names when --output_name is not given.
DEFAULT_STEP_NAME = "at"
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_LAST_NAME = "last"

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


def check_save_model_as(value: str) -> str:
    """Validate kohya's ``save_model_as``; only safetensors is supported."""
    ext = str(value).strip().lstrip(".").lower()
    if ext in SUPPORTED_SAVE_FORMATS:
        return ext
    if ext in ("ckpt", "pt"):
        raise ConfigError(
            f"save_model_as = {value!r} is not supported: LoRAs are only written as safetensors "
            "(pickle-based .ckpt/.pt can run code when loaded); set save_model_as = \"safetensors\""
        )
    raise ConfigError(f"save_model_as = {value!r} is not a known format; set save_model_as = \"safetensors\"")


def checkpoint_filename(
    output_name: str | None,
    *,
    step: int | None = None,
    epoch: int | None = None,
    ext: str = "safetensors",
) -> str:
    """kohya's file names: ``{name}-step{step:08d}``, ``{name}-{epoch:06d}``, or ``{name}`` (final).

    With no ``output_name`` kohya uses ``at-step…``, ``epoch-…`` and ``last``.
    """
    ext = check_save_model_as(ext)
    if step is not None and epoch is not None:
        raise ValueError("checkpoint_filename: give step or epoch, not both")
    if output_name is not None:
        name = str(output_name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ConfigError(
                f"output_name = {output_name!r} must be a plain file name (no folders); put folders in output_dir"
            )
    if step is not None:
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        return f"{output_name or DEFAULT_STEP_NAME}-step{int(step):08d}.{ext}"
    if epoch is not None:
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        return f"{output_name or DEFAULT_EPOCH_NAME}-{int(epoch):06d}.{ext}"
    return f"{output_name or DEFAULT_LAST_NAME}.{ext}"


# --------------------------------------------------------------------------- metadata
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


# --------------------------------------------------------------------------- hashes
def _data_region_sha256(blob: bytes | memoryview) -> str:
    n = int.from_bytes(bytes(blob[:8]), "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def _legacy_hash(blob: bytes | memoryview) -> str:
    # sd-webui-additional-networks' old hash: sha256 of the 64 KiB at offset 1 MiB.
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def precalculate_safetensors_hashes(tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya precomputes them.

    Both are taken from the serialization with only the ``ss_*`` metadata (kohya's
    rule, so user metadata edits do not change them); the model hash covers the
    tensor-data region only (after the 8-byte length and the JSON header).
    """
    import safetensors.torch

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, ss_only)
    return _data_region_sha256(blob), _legacy_hash(blob)


# --------------------------------------------------------------------------- save/load
@dataclass(frozen=True)
class SavedFile:
    path: Path
    bytes: int
    sha256: str  # of the whole file
    verified: bool = True
    model_hash: str = ""  # sshs_model_hash (tensor-data region)


def _os_error(path: Path, exc: OSError) -> CheckpointError:
    text = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    hint = {
        errno_mod.ENOSPC: "free disk space or choose another output_dir",
        errno_mod.EACCES: "check the folder's permissions or choose another output_dir",
        errno_mod.EPERM: "check the folder's permissions or choose another output_dir",
        errno_mod.ENOENT: "create the folder or fix output_dir",
        errno_mod.EROFS: "choose a writable output_dir",
    }.get(exc.errno or -1, "check output_dir")
    return CheckpointError(f"could not save {path}: {text}; {hint}")


def _check_finite(tensors: Mapping[str, Tensor], path: Path, where: str) -> None:
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"not saving {path}: {key} contains NaN or Inf{where}; training diverged — "
                "lower the learning rate or resume from an earlier checkpoint"
            )


def save_lora_file(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> SavedFile:
    """Write ``tensors`` + ``metadata`` to ``path`` atomically and verify it.

    Adds ``sshs_model_hash``/``sshs_legacy_hash``. On any failure the temp file is
    removed, ``path`` (and any earlier file there) is untouched, and a one-line
    CheckpointError is raised.
    """
    import safetensors.torch

    path = Path(path)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must be str -> str, got {key!r}: {type(value).__name__}")
    _check_finite(tensors, path, "")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    meta = dict(metadata)
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    blob = safetensors.torch.save(tensors, meta)
    if _data_region_sha256(blob) != model_hash:  # pragma: no cover - safetensors invariant
        raise CheckpointError(f"not saving {path}: tensor data changed between serializations; report this bug")
    file_sha = hashlib.sha256(blob).hexdigest()

    try:
        write_file(path, blob, check=lambda tmp: _verify(tmp, path, tensors, meta))
    except OSError as exc:
        raise _os_error(path, exc) from None
    return SavedFile(path=path, bytes=len(blob), sha256=file_sha, verified=True, model_hash=model_hash)


def _verify(tmp: Path, path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(tmp), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            got_meta = f.metadata() or {}
            if keys != set(tensors):
                raise CheckpointError(f"not saving {path}: the written file's keys differ from the network's; report this bug")
            read = {}
            for key in keys:
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(tensors[key].shape) or t.dtype != tensors[key].dtype:
                    raise CheckpointError(
                        f"not saving {path}: {key} reads back as {t.dtype} {list(t.shape)}, "
                        f"expected {tensors[key].dtype} {list(tensors[key].shape)}; report this bug"
                    )
                read[key] = t
    except OSError as exc:
        raise _os_error(path, exc) from None
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"not saving {path}: the written file could not be read back ({exc}); check the disk") from None
    _check_finite(read, path, " after writing (disk or memory error)")
    if dict(got_meta) != dict(meta):
        raise CheckpointError(f"not saving {path}: the written file's metadata differs; check the disk")


def cleanup_temp_files(folder: Path) -> list[Path]:
    """Remove ``.{name}.tmp-<pid>-<hex>`` files a killed run left in ``folder``."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    except OSError as exc:
        raise _os_error(folder, exc) from None
    for entry in entries:
        if is_temp_name(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CheckpointError(f"could not remove the stale temp file {entry}: {os.strerror(exc.errno or 0)}; delete it by hand") from None
            removed.append(entry)
    return sorted(removed)


def read_lora_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a LoRA ``.safetensors`` file: ``(tensors on CPU, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        raise CheckpointError(f"could not read {path}: {os.strerror(exc.errno or 0)}; check the file") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(exc).__name__}); it may be truncated — use another checkpoint") from None
    return tensors, meta


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def read_lora_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a ``.safetensors`` file from its header alone (no tensors read),
    or None when the file is missing, unreadable or not safetensors."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return {} if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()}
