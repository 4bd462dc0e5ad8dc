"""How often an attached viewer redraws: slower while the machine has (almost) no idle CPU.

A viewer's CPU is taken from the training whenever the training already keeps every core busy
(a CPU-only box). There the viewer backs off: it redraws ``BUSY_FACTOR`` times less often and
reads the events file less often, until a core is free again. On a GPU or MPS machine the
training leaves cores idle and the viewer keeps its normal pace. Keys are always handled at once.

:class:`ViewerPace` is pure (it is told how much CPU was idle); :class:`IdleCpu` measures that.
:class:`Pace` spaces one costly redraw (the live cockpit's loss chart) by its own cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

BUSY_IDLE_CORES = 0.5      # less idle CPU than half a core over the last interval: the box is busy
CALM_IDLE_CORES = 1.0      # a whole idle core again: back to the normal pace (no flapping in between)
BUSY_FACTOR = 5            # busy: redraws and chart this many times less often
BUSY_POLL = 1.0            # busy: seconds between reads of the events file (normal: the source's own)
VIEW_INTERVAL = 2.0        # a viewer redraws its panels every 2 s (--refresh; the live cockpit: 4 Hz)
PLOT_EVERY = 4             # and its loss chart, the costly panel, every 4th redraw while the run is live


@dataclass
class ViewerPace:
    """The viewer's redraw interval, given how many cores sat idle during the last one."""

    refresh: float                    # seconds between redraws when the box has idle CPU (--refresh)
    busy: bool = False

    def observe(self, idle_cores: float | None) -> bool:
        """Take one measurement (None: unknown, keep the pace). True when the pace changed."""
        if idle_cores is None:
            return False
        busy = idle_cores < (CALM_IDLE_CORES if self.busy else BUSY_IDLE_CORES)
        changed = busy != self.busy
        self.busy = busy
        return changed

    @property
    def interval(self) -> float:
        return self.refresh * BUSY_FACTOR if self.busy else self.refresh

    def label(self) -> str:
        return f"CPU busy: redraw every {self.interval:g} s" if self.busy else ""


class IdleCpu:
    """Idle CPU, in cores, between one call and the next (None when it cannot be read)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: tuple[float, float] | None = None
        self()                            # the baseline

    def __call__(self) -> float | None:
        try:
            import psutil

            times = psutil.cpu_times()
            idle = times.idle + getattr(times, "iowait", 0.0)
        except Exception:  # noqa: BLE001 - no /proc, a sandbox: the pace just stays as it is
            self._last = None
            return None
        now = self._clock()
        previous, self._last = self._last, (now, idle)
        if previous is None or now <= previous[0]:
            return None
        return max(0.0, (idle - previous[1]) / (now - previous[0]))


class Pace:
    """Yes at most once per ``interval`` of a monotonic clock, or at once when forced.

    The interval is ``seconds``, or longer where the work it paces costs more than ``share`` of it
    (:meth:`spent` tells the latest cost): the work then takes at most that share of one core."""

    def __init__(self, seconds: float, share: float | None = None) -> None:
        self.seconds = seconds
        self.share = share
        self.cost = 0.0
        self.at = float("-inf")

    @property
    def interval(self) -> float:
        return max(self.seconds, self.cost / self.share) if self.share else self.seconds

    def spent(self, seconds: float) -> None:
        self.cost = seconds

    def due(self, now: float, force: bool = False) -> bool:
        if force or now - self.at >= self.interval:
            self.at = now
            return True
        return False
