"""The memory part of the cockpit's state: folding a memory sample in, and how full memory is.

Swap is unified memory's pressure on a Mac: when the run's working set no longer fits, macOS pages it
out and an MPS step slows down many times over long before any allocation fails. Some swap is normal
(other apps, the memory compressor's spill), so the cockpit compares with the swap in use when the run
started and warns when it has grown by more than :data:`SWAP_GROWTH_WARN`. 512 MiB is about 3 % of a
16 GB Mac: well above the background churn of an otherwise idle machine (tens of MB over a run), and
below what one fp32 SD1.5 activation step at 512 px adds (about 1.5 GB), so a run that starts to spill
is flagged at its first spilled step rather than after the slowdown has been noticed.
"""

from __future__ import annotations

from dataclasses import replace

from engine.api import MemorySample

MEMORY_HISTORY = 60                 # memory samples kept for the sparkline
SWAP_GROWTH_WARN = 512 * 2**20      # swap grown this much since the run started: yellow


def fold_memory(state, event: MemorySample, version: int):
    """``state`` with ``event`` as its latest sample: the sparkline's history, the swap in use at the
    run's first sample and its growth since."""
    value = event.allocated if event.allocated is not None else event.rss
    at_start = state.swap_at_start
    if at_start is None and event.swap_used is not None:
        at_start = event.swap_used
    growth = event.swap_used - at_start if event.swap_used is not None and at_start is not None else 0
    return replace(state, memory=event, memory_history=(state.memory_history + (value,))[-MEMORY_HISTORY:],
                   swap_at_start=at_start, swap_growth=growth, version=version)


def swap_warning(state) -> bool:
    """Swap has grown past :data:`SWAP_GROWTH_WARN` since the run started."""
    return state.swap_growth > SWAP_GROWTH_WARN


def memory_pressure(sample: MemorySample | None) -> float:
    """The fullest of the limits that matter, 0..1 (device budget, then system RAM)."""
    if sample is None:
        return 0.0
    levels = []
    if sample.device_total:
        used = sample.reserved if sample.reserved is not None else sample.allocated
        if used is not None:
            levels.append(used / sample.device_total)
    if sample.sys_total:
        levels.append(1.0 - sample.sys_available / sample.sys_total)
    return max(levels, default=0.0)
