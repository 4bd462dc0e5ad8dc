"""Latents cached on disk (``--cache_latents_to_disk``), shared by every run on this machine.

Folder: ``$XDG_CACHE_HOME/spyke-cockpit/latents/`` (``~/.cache/spyke-cockpit/latents/`` when
XDG_CACHE_HOME is unset); safe to delete at any time. One ``<key>.safetensors`` per image x
bucket x resize method x flip x VAE. Unlike kohya's ``<image>.npz`` written beside each image, nothing is
written into the dataset folder, and the key is the image's *content* (so a re-saved or
renamed image is never served stale latents) plus the VAE's identity (weights and dtype).

What is stored is the VAE's latent distribution (``latent_dist.parameters``: mean and
log-variance), not a sample: the run draws ``mean + std * noise`` from its own seeded
generator exactly as it does without the cache, so a run is the same with a cold cache, a
warm cache or no cache.

The training setup calls, per (entry, flip), before encoding::

    key = cache_key(image_sha256(entry.path), entry.bucket, entry.resized_size, flip, vae_identity(vae, dtype),
                    resize_method)     # engine.resize.method: how the image is resized to resized_size
    moments = cache.get(key)
    if moments is None:
        moments = vae.encode(pixels).latent_dist.parameters[0]
        cache.put(key, moments)
    latents = DiagonalGaussianDistribution(moments[None]).sample(generator) * 0.18215
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.io.atomic import write_file
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["default_cache_dir", "LatentDiskCache", "cache_key", "image_sha256", "vae_identity"]

FORMAT = "spyke-latents-2"   # 2: the key names the resize method (kohya's resize_interpolation)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spyke-cockpit" / "latents"


def image_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vae_identity(vae, dtype) -> str:
    """A digest of the VAE's weights (every tensor's bytes, in name order) and the dtype it encodes in."""
    import torch

    h = hashlib.sha256(f"{FORMAT}|{dtype}".encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(image_hash: str, bucket: tuple[int, int], resized_size: tuple[int, int], flip: bool,
              vae_id: str, resize_method: str = "") -> str:
    text = (f"{FORMAT}|{image_hash}|{bucket[0]}x{bucket[1]}|{resized_size[0]}x{resized_size[1]}|{int(flip)}|{vae_id}"
            f"|{resize_method}")
    return hashlib.sha256(text.encode()).hexdigest()


class LatentDiskCache:
    """``get(key)`` → the stored tensor or None; ``put(key, tensor)`` writes atomically (temp file + rename)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> "torch.Tensor | None":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["moments"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None          # a damaged entry is re-encoded and overwritten

    def put(self, key: str, tensor: "torch.Tensor") -> Path:
        from safetensors.torch import save

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"moments": tensor.detach().to("cpu").contiguous()}, metadata={"format": FORMAT})
        return write_file(path, data)
