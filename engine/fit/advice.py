"""What to change so a run fits: the memory estimator's settings, searched against a budget (no torch).

Each family of settings lowers the peak one way (latents cached, gradient checkpointing, mixed precision
on a GPU and then the base model in float8 on CUDA, a smaller batch, the text encoder left untrained, a lower resolution); a family with steps (the
batch halved, the resolution at three quarters, again) offers its mildest step first. :func:`advise`
estimates the peak after each (``engine.fit.estimate``) and names:

* the single changes that fit the budget, each family at its mildest step that does, when one suffices;
* else the smallest combination that fits (fewest families; then the mildest: checkpointing and caching
  before the batch, the text encoder and the resolution, and the fewest steps down a ladder);
* else nothing fits, and ``closest`` is every family at its last step together (less those that lower
  nothing beside the others), the lowest it gets.

The same search serves the pre-flight refusal and the out-of-memory stop (``engine.train.oom``), and the
texts it writes (``--gradient_checkpointing (est. peak 6.1 GB, −1.4 GB)``, several flags joined by
spaces) are read back by :func:`change_flags`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable

from engine.fit.estimate import Settings, estimate
from engine.fit.shapes import ModelShapes

GB = 1e9
MIN_SIDE = 256                       # the ladder of resolutions stops here


def size(n: int) -> str:
    return f"{n / GB:.1f} GB" if abs(n) >= GB else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class Option:
    flag: str                        # ``--train_batch_size=2``
    changes: dict                    # Settings fields it sets


@dataclass(frozen=True)
class Family:
    name: str
    rank: int                        # lower: milder on the trained result
    steps: tuple[Option, ...]        # mildest first


@dataclass(frozen=True)
class Change:
    flags: tuple[str, ...]
    peak: int                        # estimated peak after the change
    saving: int                      # the estimate as set, less ``peak``

    def text(self) -> str:
        return f"{' '.join(self.flags)} (est. peak {size(self.peak)}, −{size(self.saving)})"


@dataclass(frozen=True)
class Advice:
    peak: int                        # the estimate as set
    target: int | None               # what a change must bring the peak to (None: no budget)
    fits: tuple[Change, ...] = ()    # singles that fit, else the smallest combination
    closest: Change | None = None    # nothing fits: all families together
    savings: tuple[Change, ...] = field(default=())   # each family's mildest step, largest saving first

    def suggestions(self) -> list[Change]:
        """What to offer: the changes that fit, else the closest, else (no budget) the savings."""
        if self.target is None:
            return list(self.savings)
        return list(self.fits) or ([self.closest] if self.closest else [])

    def line(self, budget: str) -> str:
        """``to fit in 8.0 GB unified: A, B`` / ``nothing … fits in …; the closest: C`` / ``to lower it: …``;
        "" when there is nothing to change. ``budget`` names the target (``8.0 GB unified``)."""
        if self.target is None:
            return f"to lower it: {', '.join(c.text() for c in self.savings)}" if self.savings else ""
        if self.fits:
            return f"to fit in {budget}: {', '.join(c.text() for c in self.fits)}"
        if self.closest:
            return f"no setting named here fits in {budget}; the closest: {self.closest.text()}"
        return ""


def lower_resolution(width: int, height: int) -> tuple[int, int] | None:
    """Three quarters of the side, down to a multiple of 64 (None at or below 256 px)."""
    w, h = (max(64, int(width * 0.75) // 64 * 64), max(64, int(height * 0.75) // 64 * 64))
    return (w, h) if min(width, height) > MIN_SIDE and (w, h) != (width, height) else None


def resolution_flag(wh: tuple[int, int]) -> str:
    return f"--resolution={wh[0]}" if wh[0] == wh[1] else f"--resolution={wh[0]},{wh[1]}"


# (flag, the value asked for) -> the Settings fields it sets, or None when it would change nothing
Effect = Callable[[str, object], dict | None]


def families(s: Settings, *, resolution: tuple[int, int] | None = None, effect: Effect | None = None,
             can_cache: bool = True) -> list[Family]:
    """The ways to lower ``s``'s peak that are not set yet. ``resolution``: the configured one (the
    ladder's start; default ``s``'s largest batch size); ``effect`` maps a batch size or a resolution to
    the Settings fields it would really set (a dataset config may hold its own), default: directly."""
    def direct(kind: str, value) -> dict | None:
        if kind == "batch":
            return {"batch": value}
        w0, h0 = resolution or (s.width, s.height)
        return {"width": s.width * value[0] // w0, "height": s.height * value[1] // h0}

    effect = effect or direct
    out: list[Family] = []
    if not s.cache_latents and can_cache:
        out.append(Family("cache_latents", 0, (Option("--cache_latents", {"cache_latents": True}),)))
    if not s.gradient_checkpointing:
        out.append(Family("gradient_checkpointing", 1,
                          (Option("--gradient_checkpointing", {"gradient_checkpointing": True}),)))
    # --fp8_base (the frozen base in float8, kohya's flag) where float8 computes: CUDA, a network that adds to
    # the base layer's forward, under mixed precision -- on its own, or as the precision family's second step
    from engine.models import FP8_NETWORKS

    fp8 = (s.device == "cuda" and not (s.fp8_base or s.fp8_base_unet) and s.network_module in FP8_NETWORKS)
    if s.device in ("cuda", "mps") and s.mixed_precision == "no":
        precision = "bf16" if s.device == "cuda" else "fp16"
        steps = [Option(f"--mixed_precision={precision}", {"mixed_precision": precision})]
        if fp8:
            steps.append(Option(f"--mixed_precision={precision} --fp8_base",
                                {"mixed_precision": precision, "fp8_base": True}))
        out.append(Family("mixed_precision", 2, tuple(steps)))
    elif fp8 and s.mixed_precision != "no":
        out.append(Family("fp8_base", 2, (Option("--fp8_base", {"fp8_base": True}),)))
    batches, b = [], s.batch
    while b > 1:
        b = max(1, b // 2)
        if (changes := effect("batch", b)) is not None:
            batches.append(Option(f"--train_batch_size={b}", changes))
    if batches:
        out.append(Family("batch", 3, tuple(batches)))
    if s.train_text_encoder and s.train_unet:
        out.append(Family("unet_only", 4, (Option("--network_train_unet_only", {"train_text_encoder": False}),)))
    sides, wh = [], resolution or (s.width, s.height)
    while (wh := lower_resolution(*wh)) is not None:
        if (changes := effect("resolution", wh)) is not None:
            sides.append(Option(resolution_flag(wh), changes))
    if sides:
        out.append(Family("resolution", 5, tuple(sides)))
    return out


def advise(shapes: ModelShapes, s: Settings, fams: list[Family], target: int | None) -> Advice:
    """Search ``fams`` for the changes that bring ``s``'s estimated peak to ``target`` (module docstring)."""
    cache: dict[Settings, int] = {}

    def peak(options: tuple[Option, ...]) -> int:
        changed = replace(s, **{k: v for o in options for k, v in o.changes.items()})
        if changed not in cache:
            cache[changed] = estimate(shapes, changed).peak_bytes
        return cache[changed]

    base = peak(())

    def change(options: tuple[Option, ...]) -> Change:
        after = peak(options)
        return Change(tuple(o.flag for o in options), after, base - after)

    savings = sorted((c for c in (change((f.steps[0],)) for f in fams) if c.saving > 0), key=lambda c: -c.saving)
    if target is None:
        return Advice(base, None, savings=tuple(savings))
    singles = []
    for fam in sorted(fams, key=lambda f: f.rank):
        step = next((o for o in fam.steps if peak((o,)) <= target), None)
        if step is not None:
            singles.append(change((step,)))
    if singles:
        return Advice(base, target, tuple(singles), savings=tuple(savings))
    for k in range(2, len(fams) + 1):
        best = None
        for group in itertools.combinations(fams, k):
            for picks in itertools.product(*(enumerate(f.steps) for f in group)):
                options = tuple(o for _, o in picks)
                if peak(options) > target:
                    continue
                key = (sum(f.rank for f in group), sum(i for i, _ in picks), -peak(options))
                if best is None or key < best[0]:
                    best = (key, options)
        if best is not None:
            return Advice(base, target, (change(best[1]),), savings=tuple(savings))
    strongest = [f.steps[-1] for f in fams]
    for option in list(strongest):          # leave out what lowers nothing beside the others
        rest = tuple(o for o in strongest if o is not option)
        if peak(rest) <= peak(tuple(strongest)):
            strongest = list(rest)
    closest = change(tuple(strongest)) if strongest else None
    return Advice(base, target, (), closest if closest and closest.saving > 0 else None, tuple(savings))


def change_flags(text: str) -> list[tuple[str, str | None]]:
    """The flags of a suggestion as :meth:`Change.text` (or the out-of-memory stop) writes it:
    ``[("gradient_checkpointing", None), ("train_batch_size", "1")]``; [] when it names no flag."""
    out: list[tuple[str, str | None]] = []
    for word in text.split(" (", 1)[0].split():
        if not word.startswith("--") or len(word) < 3:
            return []
        name, _, value = word[2:].partition("=")
        out.append((name, value if "=" in word else None))
    return out


def savings(shapes: ModelShapes, s: Settings) -> list[tuple[str, int]]:
    """Each setting that would lower ``s``'s peak (its mildest step), with its saving, largest first."""
    return [(" ".join(c.flags), c.saving) for c in advise(shapes, s, families(s), None).savings]
