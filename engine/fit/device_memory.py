"""How much memory the run's device has, read without starting a model (every device API guarded).

* MPS: unified memory is shared with the system, so the budget is psutil's total RAM, capped by
  ``torch.mps.recommended_max_memory()`` where torch offers it (the GPU's working-set limit).
* CUDA: ``torch.cuda.mem_get_info()`` free bytes of the current device.
* CPU: psutil's available RAM.

Inside a run (``in_use=True``, the out-of-memory stop) the budget is what the run could have had: on
CUDA the free bytes plus what torch's allocator holds for this process, on the CPU the available RAM
plus this process's resident memory; MPS's budget does not depend on what is in use.

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


def _own_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def _cuda_reserved(torch) -> int:
    try:
        return int(torch.cuda.memory_reserved())
    except Exception:  # noqa: BLE001
        return 0


def device_memory(device: str = "auto", *, platform: str | None = None, in_use: bool = False) -> DeviceMemory | None:
    """The memory budget of the device a run of ``--device=device`` would use; None if unreadable.
    ``in_use``: asked from inside the run (see the module docstring)."""
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
            if in_use:
                return DeviceMemory("cuda", int(free) + _cuda_reserved(torch), int(total), "usable on the GPU")
            return DeviceMemory("cuda", int(free), int(total), "free on the GPU")
        except Exception:  # noqa: BLE001
            return None
    if in_use:
        return DeviceMemory("cpu", min(int(vm.total), int(vm.available) + _own_rss()), int(vm.total), "usable RAM")
    return DeviceMemory("cpu", int(vm.available), int(vm.total), "available RAM")
