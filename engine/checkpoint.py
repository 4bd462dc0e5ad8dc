"""LoRA files (``.safetensors``; kohya's ``.ckpt``/``.pt``): verified atomic saves, reads, leftover-temp cleanup.

Names, metadata and hashes are kohya's and live in ``engine.kohya``.

A save never leaves a half-written ``.safetensors`` where a finished one is expected:
the bytes go to ``.{name}.tmp-<pid>-<rand>`` in the same folder, are fsynced, read
back and checked, and only then ``os.replace``d into place (and the folder fsynced).
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import CheckpointError, DiskFullError
from engine.io.atomic import is_temp_name, write_file
from engine.kohya.hashes import data_region_sha256, precalculate_safetensors_hashes

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor


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
    if exc.errno == errno_mod.ENOSPC:
        return DiskFullError(f"could not save {path}: {text}; {hint}")
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
    if data_region_sha256(blob) != model_hash:  # pragma: no cover - safetensors invariant
        raise CheckpointError(f"not saving {path}: tensor data changed between serializations; report this bug")
    file_sha = hashlib.sha256(blob).hexdigest()

    try:
        write_file(path, blob, check=lambda tmp: _verify(tmp, path, tensors, meta))
    except OSError as exc:
        raise _os_error(path, exc) from None
    return SavedFile(path=path, bytes=len(blob), sha256=file_sha, verified=True, model_hash=model_hash)


def save_lora_torch_file(path: Path, tensors: dict[str, Tensor]) -> SavedFile:
    """kohya's ``.ckpt``/``.pt`` LoRA: ``torch.save`` of the state dict alone (kohya writes no metadata
    into these), through the same atomic write; read back with ``torch.load(weights_only=True)`` and
    checked before it is renamed into place."""
    import io

    import torch

    path = Path(path)
    _check_finite(tensors, path, "")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    blob = buffer.getvalue()
    try:
        write_file(path, blob, check=lambda tmp: _verify_torch(tmp, path, tensors))
    except OSError as exc:
        raise _os_error(path, exc) from None
    return SavedFile(path=path, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(), verified=True)


def _load_torch(path: Path) -> dict:
    import torch

    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise ValueError("not a state dict of tensors")
    return loaded


def _verify_torch(tmp: Path, path: Path, tensors: Mapping[str, Tensor]) -> None:
    try:
        read = _load_torch(tmp)
    except OSError as exc:
        raise _os_error(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"not saving {path}: the written file could not be read back ({exc}); "
                              "check the disk") from None
    if set(read) != set(tensors) or any(tuple(read[k].shape) != tuple(t.shape) or read[k].dtype != t.dtype
                                        for k, t in tensors.items()):
        raise CheckpointError(f"not saving {path}: the written file's tensors differ from the network's; "
                              "report this bug")
    _check_finite(read, path, " after writing (disk or memory error)")


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
    """Read a LoRA ``.safetensors`` file: ``(tensors on CPU, metadata)``; a ``.ckpt``/``.pt`` one (kohya's
    torch.save format) with ``torch.load(weights_only=True)``, which runs no code from the file: no metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist; check the path")
    if path.suffix.lower() in (".ckpt", ".pt"):
        try:
            return _load_torch(path), {}
        except OSError as exc:
            raise CheckpointError(f"could not read {path}: {os.strerror(exc.errno or 0)}; check the file") from None
        except Exception as exc:  # noqa: BLE001 - unpickling refusals and corrupt archives alike
            raise CheckpointError(f"{path} is not a LoRA state dict torch.load can read with weights_only=True "
                                  f"({type(exc).__name__}); use a .safetensors file or another checkpoint") from None
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
