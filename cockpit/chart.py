"""What the loss chart draws (plotext calls), apart from the widget: series, ticks, epoch marks, legend.

The chart draws at most ``width`` points per series whatever the run's length, so a redraw costs the
same at step 100 and at step 1,000,000. The legend is markup for the panel's title, outside the plot
area, in the series' own colours.
"""

from __future__ import annotations

import math
from typing import Any

from cockpit.history import downsample, smooth
from cockpit.state import CockpitState

# RGB colours: plotext draws them as true colours, and the legend's markup shows the very same ones
LOSS_COLOR, EMA_COLOR, VAL_COLOR, EPOCH_COLOR = (77, 150, 255), (80, 200, 120), (255, 80, 200), (128, 128, 128)
LR_COLORS = ((0, 200, 200), (230, 200, 0), (255, 120, 60), (200, 200, 200))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


MAX_EPOCH_MARKS = 40        # more epoch boundaries than this: none drawn (they would hide the data)


def int_ticks(lo: int, hi: int, slots: int) -> list[int]:
    """Round, whole-step ticks between ``lo`` and ``hi``, at most ``slots`` of them (1, 2, 5 × 10^k apart)."""
    if hi <= lo:
        return [lo]
    slots = max(2, slots)
    raw = (hi - lo) / (slots - 1)
    base = 10 ** max(0, math.floor(math.log10(max(raw, 1))))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    step = max(1, int(step))
    first = -(-lo // step) * step
    return list(range(first, hi + 1, step)) or [lo]


def tick_label(step: int) -> str:
    if step >= 1_000_000 and step % 1_000_000 == 0:
        return f"{step // 1_000_000}M"
    if step >= 10_000 and step % 1000 == 0:
        return f"{step // 1000}k"
    return str(step)


def epoch_boundaries(state: CockpitState, lo: int, hi: int) -> list[int]:
    """The steps where an epoch ends, inside the plotted range (none when there are too many to show)."""
    per = state.batches_per_epoch
    if per <= 0 or state.num_epochs <= 1:
        return []
    first, last = max(1, -(-lo // per)), min(state.num_epochs - 1, hi // per)
    if last - first + 1 > MAX_EPOCH_MARKS:
        return []
    return [e * per for e in range(first, last + 1) if lo < e * per < hi]


def _axes(plt: Any, state: CockpitState, xs: list[int], width: int) -> None:
    lo, hi = min(xs), max(xs)
    ticks = int_ticks(lo, hi, max(2, width // 10))
    plt.xticks(ticks, [tick_label(t) for t in ticks])
    for boundary in epoch_boundaries(state, lo, hi):
        plt.vline(boundary, EPOCH_COLOR)


def draw_loss(plt: Any, state: CockpitState, width: int) -> None:
    """Training loss, its EMA and the validation loss."""
    xs: list[int] = []
    if len(state.history):
        xs, ys, ns = state.history.series(width)
        plt.plot(xs, ys, color=LOSS_COLOR, marker="braille")
        if len(xs) > 1:
            plt.plot(xs, smooth(ys, ns, state.smoothing), color=EMA_COLOR, marker="braille")
    points = [p for p in state.sample_book.validations if math.isfinite(p.loss)]
    if points:
        vx, vy, _ = downsample([p.step for p in points], [p.loss for p in points], [1] * len(points), width)
        plt.plot(vx, vy, color=VAL_COLOR, marker="braille")
        plt.scatter(vx, vy, color=VAL_COLOR, marker="◆")
        xs = xs + vx
    if xs:
        _axes(plt, state, xs, width)


def draw_lr(plt: Any, state: CockpitState, width: int) -> None:
    """The learning rate of each parameter group."""
    xs: list[int] = []
    for (name, history), color in zip(state.lr_history, LR_COLORS):
        if len(history):
            gx, gy, _ = history.series(width)
            plt.plot(gx, gy, color=color, marker="braille")
            xs = xs + gx
    if xs:
        _axes(plt, state, xs, width)


def legend_markup(state: CockpitState, mode: str) -> str:
    """The legend, as markup for the panel's title."""
    def key(color: str, label: str) -> str:
        return f"[{_hex(color)}]━━[/] {label}"

    if mode == "lr":
        items = [key(color, name) for (name, _), color in zip(state.lr_history, LR_COLORS)]
    else:
        items = [key(LOSS_COLOR, "loss"), key(EMA_COLOR, f"ema {state.smoothing:.2f}")]
        if state.sample_book.validations:
            items.append(f"[{_hex(VAL_COLOR)}]◆━[/] val loss")
    if epoch_boundaries(state, 0, max(state.step, state.total_steps) + 1):
        items.append(f"[{_hex(EPOCH_COLOR)}]│[/] epoch")
    return "  ".join(items)
