"""Device choice and memory readings, guarded so an absent device never crashes.

On torch CPU builds ``torch.mps.*`` memory calls raise and ``torch.cuda.mem_get_info``
asserts; every call here checks availability first and swallows what a driver may raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import ConfigError


def enable_mps_fallback() -> None:
    """Let ops MPS lacks fall back to the CPU (must be set before torch initialises MPS)."""
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")


def mps_available() -> bool:
    import torch

    try:
        return bool(torch.backends.mps.is_available())
    except Exception:  # noqa: BLE001 - old or odd builds
        return False


def cuda_available() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def pick_device(preference: str = "auto"):
    """auto: MPS, then CUDA, then CPU. An explicit device that is absent is a ConfigError."""
    import torch

    preference = (preference or "auto").lower()
    if preference == "auto":
        if mps_available():
            return torch.device("mps")
        if cuda_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if preference == "mps" and not mps_available():
        raise ConfigError("--device=mps: MPS is not available on this machine; use --device=auto or cpu")
    if preference == "cuda" and not cuda_available():
        raise ConfigError("--device=cuda: no CUDA GPU is visible; use --device=auto or cpu")
    if preference not in ("mps", "cuda", "cpu"):
        raise ConfigError(f"--device must be auto, mps, cuda or cpu (got {preference!r})")
    return torch.device(preference)


@dataclass(frozen=True)
class MemoryReading:
    device: str
    rss: int
    sys_used: int
    sys_available: int
    sys_total: int
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None
    device_total: int | None = None
    swap_used: int | None = None        # the system's swap in use (on a Mac: unified memory spilling to disk)


def _safe(fn, *args):
    try:
        return int(fn(*args))
    except Exception:  # noqa: BLE001 - a missing backend or driver must never crash a run
        return None


def _mps_call(torch, name: str) -> int | None:
    """``torch.mps.<name>()`` where this torch has it (older builds lack driver_allocated_memory and
    recommended_max_memory), else None."""
    fn = getattr(getattr(torch, "mps", None), name, None)
    return _safe(fn) if callable(fn) else None


def swap_used() -> int | None:
    """Swap in use, every platform (psutil); None where it cannot be read."""
    try:
        import psutil

        return int(psutil.swap_memory().used)
    except Exception:  # noqa: BLE001 - containers without /proc/swaps, odd platforms
        return None


def read_memory(device_type: str) -> MemoryReading:
    """Process RSS, system RAM and swap always (unified memory on a Mac is the real limit, and swap
    growing is its pressure); CUDA allocated/reserved/peak/total or MPS current/driver/recommended-max
    when present."""
    import psutil

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    allocated = reserved = peak = total = None
    if device_type == "cuda":
        import torch

        if cuda_available():
            allocated = _safe(torch.cuda.memory_allocated)
            reserved = _safe(torch.cuda.memory_reserved)
            peak = _safe(torch.cuda.max_memory_allocated)
            try:
                total = int(torch.cuda.mem_get_info()[1])
            except Exception:  # noqa: BLE001
                total = None
    elif device_type == "mps":
        import torch

        if mps_available():
            allocated = _mps_call(torch, "current_allocated_memory")
            reserved = _mps_call(torch, "driver_allocated_memory")
            total = _mps_call(torch, "recommended_max_memory")
    return MemoryReading(device_type, rss, int(vm.total - vm.available), int(vm.available), int(vm.total),
                         allocated, reserved, peak, total, swap_used())


def empty_cache(device_type: str) -> None:
    import torch

    try:
        if device_type == "cuda" and cuda_available():
            torch.cuda.empty_cache()
        elif device_type == "mps" and mps_available():
            torch.mps.empty_cache()
    except Exception:  # noqa: BLE001
        pass
