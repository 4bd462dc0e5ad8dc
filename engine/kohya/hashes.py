"""The hashes kohya records in a LoRA's metadata (``sshs_*``) and of the base model (``ss_*_hash``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

LEGACY_HASH_OFFSET = 0x100000   # the old hash reads 64 KiB at 1 MiB
LEGACY_HASH_BYTES = 0x10000


def data_region_sha256(blob: bytes | memoryview) -> str:
    n = int.from_bytes(bytes(blob[:8]), "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def legacy_hash(blob: bytes | memoryview) -> str:
    # sd-webui-additional-networks' old hash: sha256 of the 64 KiB at offset 1 MiB.
    return _short_sha256(blob[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_BYTES])


def _short_sha256(window: bytes | memoryview) -> str:
    return hashlib.sha256(window).hexdigest()[:8]


def precalculate_safetensors_hashes(tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya precomputes them.

    Both are taken from the serialization with only the ``ss_*`` metadata (kohya's
    rule, so user metadata edits do not change them); the model hash covers the
    tensor-data region only (after the 8-byte length and the JSON header).
    """
    import safetensors.torch

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, ss_only)
    return data_region_sha256(blob), legacy_hash(blob)


def file_sha256(path: Path) -> str:
    """The sha256 hex of a whole file, read in 1 MiB chunks (ss_new_sd_model_hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_legacy_hash(path: Path) -> str:
    """kohya's old 8-hex model hash of a file (ss_sd_model_hash; A1111's first model hash)."""
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return _short_sha256(f.read(LEGACY_HASH_BYTES))
