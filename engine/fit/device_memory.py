"""How much memory the run's device has, read without starting a model (every device API guarded).

* MPS: unified memory is shared with the system, so the budget is psutil's total RAM, capped by
  ``torch.mps.recommended_max_memory()`` where torch offers it (the GPU's working-set limit).
* CUDA: ``torch.cuda.mem_get_info()`` free bytes of the current device.
* CPU: psutil's available RAM.

Torch is imported only where it must be asked: for ``--device=cuda|mps``, for ``auto`` on macOS
or on a machine with an NVIDIA driver, or when torch is already loaded (inside a run).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceMemory:
    device: str            # cpu | cuda | mps
    budget: int            # bytes the run may use
    total: int             # the machine's (or GPU's) total, for the preview line
    label: str             # how the budget reads: "available RAM", "free on the GPU", "unified"


def _psutil():
    import psutil

    return psutil.virtual_memory()


def _torch_if_worth_it(device: str, platform: str):
    if device in ("cuda", "mps") or "torch" in sys.modules:
        pass
    elif device == "auto" and (platform == "darwin" or os.path.exists("/proc/driver/nvidia/version")):
        pass
    else:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _mps(torch) -> bool:
    try:
        return bool(torch is not None and torch.backends.mps.is_available())
    except Exception:  # noqa: BLE001
        return False


def _cuda(torch) -> bool:
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def device_memory(device: str = "auto", *, platform: str | None = None) -> DeviceMemory | None:
    """The memory budget of the device a run of ``--device=device`` would use; None if unreadable."""
    platform = sys.platform if platform is None else platform
    torch = _torch_if_worth_it(device, platform)
    try:
        vm = _psutil()
    except Exception:  # noqa: BLE001 - psutil missing or failing: no verdict, never a crash
        return None
    if device in ("auto", "mps") and _mps(torch):
        budget = int(vm.total)
        rec = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        if callable(rec):
            try:
                budget = min(budget, int(rec()))
            except Exception:  # noqa: BLE001
                pass
        return DeviceMemory("mps", budget, int(vm.total), "unified")
    if device in ("auto", "cuda") and _cuda(torch):
        try:
            free, total = torch.cuda.mem_get_info()
            return DeviceMemory("cuda", int(free), int(total), "free on the GPU")
        except Exception:  # noqa: BLE001
            return None
    return DeviceMemory("cpu", int(vm.available), int(vm.total), "available RAM")
