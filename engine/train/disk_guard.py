"""Disk full at a save: refuse a write that cannot complete, then pause or stop (``on_disk_full``).

Before a checkpoint or state is written, the bytes it needs are compared with the output folder's
free space (less a margin); a real ENOSPC from the atomic writer is treated the same. Earlier files
are never touched: the atomic writer removes its temp file or folder. Then:

* ``pause`` (the cockpit, where someone is watching): an error line, the run pauses; the user frees
  space and resumes (space), and the save is retried. Aborting from that pause stops the run.
* ``stop`` (headless): a training state is written first if it fits, and the run stops with the
  resume command.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from engine.disk_budget import FREE_SPACE_MARGIN, HEADER_BYTES_PER_TENSOR, file_overhead
from engine.errors import DiskFullError
from engine.events import Event, LogMessage, PhaseChanged
from engine.units import format_bytes

ON_DISK_FULL = ("pause", "stop")


def free_bytes(folder: Path) -> int | None:
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(shutil.disk_usage(probe).free)
    except OSError:
        return None


def tensor_bytes(tensors) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors)


def checkpoint_need(shapes: dict[str, tuple[int, ...]], save_dtype, save_model_as: str = "safetensors") -> int:
    """A checkpoint's size from the network's tensor shapes at the save dtype (+ the format's header,
    metadata or archive records)."""
    import math

    import torch

    size = torch.empty((), dtype=save_dtype or torch.float32).element_size()
    return sum(math.prod(s) for s in shapes.values()) * size + file_overhead(len(shapes), save_model_as)


def state_need(shapes: dict[str, tuple[int, ...]], optimizer_state: dict | None) -> int:
    """A state folder's size: the LoRA in fp32, the optimizer's tensors, and small files."""
    import math

    import torch

    lora = sum(math.prod(s) for s in shapes.values()) * 4 + len(shapes) * HEADER_BYTES_PER_TENSOR
    opt = 0
    for per_param in (optimizer_state or {}).get("state", {}).values():
        opt += tensor_bytes(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return lora + opt + 64 * 1024


class DiskGuard:
    """``control`` and ``poll``: the run's control (to pause on) and its channel's poll."""

    def __init__(self, mode: str, folder: Path, emit: Callable[[Event], None], control=None,
                 poll: Callable[[], None] | None = None) -> None:
        if mode not in ON_DISK_FULL:
            raise ValueError(f"on_disk_full must be one of {ON_DISK_FULL}, got {mode!r}")
        self.mode, self.folder, self.emit, self.control, self.poll = mode, Path(folder), emit, control, poll

    def refusal(self, needed: int, what: str) -> DiskFullError | None:
        """The error to raise when ``needed`` bytes will not fit (None when they will, or free space is unknown)."""
        free = free_bytes(self.folder)
        if free is None or needed <= free - FREE_SPACE_MARGIN:
            return None
        return DiskFullError(f"disk full: not writing {what} ({format_bytes(needed)} needed, "
                             f"{format_bytes(free)} free in {self.folder}); earlier files are intact — "
                             "free space or choose another --output_dir")

    def fits(self, needed: int) -> bool:
        free = free_bytes(self.folder)
        return free is None or needed <= free - FREE_SPACE_MARGIN

    def check(self, needed: int, what: str) -> None:
        if (err := self.refusal(needed, what)) is not None:
            raise err

    def wait_or_raise(self, err: DiskFullError, phase_after: str = "saving") -> None:
        """``pause``: report ``err``, pause until resumed (return: retry the save) or aborted (raise).
        ``stop``: raise."""
        if self.mode != "pause" or self.control is None:
            raise err
        self.emit(LogMessage(level="error", message=f"{err}; paused: free space, then press space to retry "
                                                    "the save"))
        self.control.pause()

        def on_pause(entering: bool) -> None:
            self.emit(PhaseChanged(phase="paused" if entering else phase_after, detail="disk full" if entering
                                   else ""))

        decision = self.control.between_steps(on_pause, lambda: None, self.poll)
        if decision.abort:
            raise err
        self.emit(LogMessage(level="info", message="retrying the save"))
