"""The loss history and its EMA: the one piece of the cockpit's state that grows with the run.

:class:`LossHistory` is bounded (pairs of buckets merge when it fills up), so memory and redraw
cost stay the same at step 100 and at step 1,000,000. It is persistent: :meth:`LossHistory.appended`
returns a new history and leaves the old one as it was, so the reducer stays pure at O(1)
amortised per step. :func:`ema_update` is the one EMA: the reducer, the viewer's history builder
and the chart's :func:`smooth` all fold losses through it.
"""

from __future__ import annotations

import math
from typing import Sequence

DEFAULT_CAPACITY = 2048


def ema_update(ema: float | None, weight: float, value: float, smoothing: float,
               steps: int = 1) -> tuple[float, float]:
    """One point into a debiased EMA (TensorBoard style): ``(ema, weight)`` after ``value``, which
    stands for ``steps`` steps (it decays the past by ``smoothing ** steps``). Start from ``(None, 0.0)``."""
    decay = smoothing if steps <= 1 else smoothing ** steps
    acc = (ema or 0.0) * weight * decay + (1 - decay) * value
    weight = weight * decay + (1 - decay)
    return (acc / weight if weight > 0 else value), weight


def smooth(values: Sequence[float], counts: Sequence[int], smoothing: float) -> list[float]:
    """The EMA after each point; a point that stands for k steps decays by smoothing**k."""
    out = []
    ema, weight = None, 0.0
    for value, k in zip(values, counts):
        ema, weight = ema_update(ema, weight, value, smoothing, max(1, k))
        out.append(ema)
    return out


class LossHistory:
    """Bounded history of per-step losses: at most ``capacity`` buckets of equal step count.

    When full, neighbouring buckets merge and the bucket size doubles, so appends are O(1)
    amortised and every query is O(capacity) whatever the run length. The closed buckets live in
    lists that only ever grow; a history owns a prefix of them plus its last, still filling bucket.
    A history appended to after another grew the shared lists takes its own copy first, so every
    history keeps the values it had.
    """

    __slots__ = ("capacity", "bucket_size", "total", "_steps", "_sums", "_counts", "_closed", "_last")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.bucket_size = 1
        self.total = 0                                   # steps recorded
        self._steps: list[int] = []                      # closed buckets: last step, loss sum, step count
        self._sums: list[float] = []
        self._counts: list[int] = []
        self._closed = 0                                 # how many of those lists' entries are this history's
        self._last: tuple[int, float, int] | None = None  # the last bucket (step, sum, count)

    @classmethod
    def from_buckets(cls, steps: Sequence[int], sums: Sequence[float], counts: Sequence[int],
                     capacity: int = DEFAULT_CAPACITY) -> "LossHistory":
        """A history of ready-made buckets (a coarse picture of a long run): bucket ``i`` ends at
        ``steps[i]`` and holds ``counts[i]`` steps whose losses add up to ``sums[i]``."""
        history = cls(capacity)
        if not steps:
            return history
        history.total = sum(counts)
        bucket = 1
        while bucket * capacity < history.total:
            bucket *= 2
        history.bucket_size = max(bucket, max(counts))
        history._steps, history._sums, history._counts = list(steps[:-1]), list(sums[:-1]), list(counts[:-1])
        history._closed = len(history._steps)
        history._last = (steps[-1], sums[-1], counts[-1])
        return history

    # -------------------------------------------------------------- growing
    def appended(self, step: int, loss: float) -> "LossHistory":
        """This history with one more step; this one is left as it was."""
        if not math.isfinite(loss):
            return self
        new = LossHistory.__new__(LossHistory)
        new.capacity, new.bucket_size, new.total = self.capacity, self.bucket_size, self.total
        new._steps, new._sums, new._counts = self._steps, self._sums, self._counts
        new._closed, new._last = self._closed, self._last
        new.append(step, loss)
        return new

    def append(self, step: int, loss: float) -> None:
        """One more step, in place (for a history that nothing else holds)."""
        if not math.isfinite(loss):
            return
        self.total += 1
        last = self._last
        if last is not None and last[2] < self.bucket_size:
            self._last = (step, last[1] + loss, last[2] + 1)
            return
        if last is not None:
            n = self._closed
            if len(self._steps) != n:                    # another history grew the shared lists
                self._steps, self._sums, self._counts = self._steps[:n], self._sums[:n], self._counts[:n]
            self._steps.append(last[0])
            self._sums.append(last[1])
            self._counts.append(last[2])
            self._closed = n + 1
        self._last = (step, loss, 1)
        if self._closed + 1 > self.capacity:
            self._compact()

    def _compact(self) -> None:
        steps, sums, counts = self.steps, self.sums, self.counts
        n = len(steps) // 2 * 2
        merged = ([steps[i + 1] for i in range(0, n, 2)], [sums[i] + sums[i + 1] for i in range(0, n, 2)],
                  [counts[i] + counts[i + 1] for i in range(0, n, 2)])
        if n < len(steps):
            for column, values in zip(merged, (steps, sums, counts)):
                column.append(values[-1])
        self._steps, self._sums, self._counts = (column[:-1] for column in merged)
        self._last = (merged[0][-1], merged[1][-1], merged[2][-1])
        self._closed = len(self._steps)
        self.bucket_size *= 2

    # -------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._closed + (self._last is not None)

    def _column(self, values: list, index: int) -> list:
        column = values[:self._closed]
        if self._last is not None:
            column.append(self._last[index])
        return column

    @property
    def steps(self) -> list[int]:
        """The last step in each bucket."""
        return self._column(self._steps, 0)

    @property
    def sums(self) -> list[float]:
        return self._column(self._sums, 1)

    @property
    def counts(self) -> list[int]:
        return self._column(self._counts, 2)

    def series(self, width: int) -> tuple[list[int], list[float], list[int]]:
        """At most ``width`` points: (last step, mean loss, steps in the point)."""
        return downsample(self.steps, self.sums, self.counts, width)


def downsample(steps: Sequence[int], sums: Sequence[float], counts: Sequence[int],
               width: int) -> tuple[list[int], list[float], list[int]]:
    n = len(steps)
    width = max(1, width)
    if n <= width:
        return list(steps), [s / c for s, c in zip(sums, counts)], list(counts)
    xs, ys, ns = [], [], []
    for i in range(width):
        lo, hi = i * n // width, (i + 1) * n // width
        if hi <= lo:
            continue
        total = sum(sums[lo:hi])
        count = sum(counts[lo:hi])
        xs.append(steps[hi - 1])
        ys.append(total / count)
        ns.append(count)
    return xs, ys, ns
