"""Sample sets and validation losses, folded from the engine's events (pure: no Textual, no I/O).

A run makes one batch of sample images per :class:`~engine.api.SamplesSaved` event (a checkpoint, a
``--sample_every_n_steps`` step, or the ``g`` key) and one value per
:class:`~engine.api.ValidationLoss` event. :class:`SampleBook` keeps them by step; :func:`compare_rows`
lines them up with the checkpoints, one row per checkpoint, which is what the compare screen and the
contact sheet show. The best row is the one with the lowest validation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from engine.api import CheckpointSaved, SamplesSaved, ValidationLoss


@dataclass(frozen=True)
class SampleImage:
    index: int                 # the prompt's index in the prompts file
    prompt: str
    path: str                  # "" when the prompt failed
    seed: int | None
    error: str = ""


@dataclass(frozen=True)
class SampleSet:
    step: int
    epoch: int
    images: tuple[SampleImage, ...]
    checkpoint: str | None = None
    seconds: float = 0.0

    def image(self, index: int) -> SampleImage | None:
        return next((i for i in self.images if i.index == index), None)


@dataclass(frozen=True)
class Validation:
    step: int
    loss: float
    images: int
    checkpoint: str | None = None


def belongs(step: int, checkpoint: str | None, to_step: int, to_path: str) -> bool:
    """A sample batch or validation value belongs to a checkpoint: the one it names, or (naming none) the
    one at its step."""
    return checkpoint == to_path if checkpoint else step == to_step


@dataclass(frozen=True)
class SampleBook:
    """Every sample set (by step, a later set at the same step replaces the earlier) and validation loss."""
    sets: tuple[SampleSet, ...] = ()
    validations: tuple[Validation, ...] = ()
    made: tuple[tuple[int, str | None, int], ...] = ()   # every batch as (step, checkpoint, images), replaced or not
    version: int = 0

    def images_for(self, step: int, path: str) -> int:
        """How many sample images were made for the checkpoint at ``step``/``path`` (every batch, one that
        names the checkpoint or, naming none, is at its step): the files on disk, even where a later set
        replaced an earlier one in the grid."""
        return sum(n for at, checkpoint, n in self.made if belongs(at, checkpoint, step, path))

    def validation_for(self, step: int, path: str) -> float | None:
        """The latest validation loss that names the checkpoint or, naming none, is at its step."""
        value = None
        for v in self.validations:
            if belongs(v.step, v.checkpoint, step, path):
                value = v.loss
        return value

    @property
    def latest(self) -> SampleSet | None:
        return max(self.sets, key=lambda s: s.step) if self.sets else None

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt text by index, the latest set's wording winning (the file may be edited mid-run)."""
        texts: dict[int, str] = {}
        for s in sorted(self.sets, key=lambda s: s.step):
            for image in s.images:
                texts[image.index] = image.prompt
        return tuple(texts.get(i, "") for i in range(max(texts, default=-1) + 1))

    def at(self, step: int) -> SampleSet | None:
        return next((s for s in self.sets if s.step == step), None)

    def validation_at(self, step: int) -> Validation | None:
        return next((v for v in self.validations if v.step == step), None)

    @property
    def best(self) -> Validation | None:
        """The lowest finite validation loss (the earliest step on a tie)."""
        finite = [v for v in self.validations if math.isfinite(v.loss)]
        return min(finite, key=lambda v: (v.loss, v.step)) if finite else None


def fold(book: SampleBook, event: SamplesSaved | ValidationLoss) -> SampleBook:
    """The book with one more sample set or validation value."""
    if isinstance(event, SamplesSaved):
        errors = list(event.errors) + [""] * (len(event.paths) - len(event.errors))
        seeds = list(event.seeds) + [None] * (len(event.paths) - len(event.seeds))
        prompts = list(event.prompts) + [""] * (len(event.paths) - len(event.prompts))
        images = tuple(SampleImage(i, prompts[i], event.paths[i] or "", seeds[i], errors[i] or "")
                       for i in range(len(event.paths)))
        new = SampleSet(event.step, event.epoch, images, event.checkpoint, event.seconds)
        sets = tuple(s for s in book.sets if s.step != event.step) + (new,)
        return replace(book, sets=tuple(sorted(sets, key=lambda s: s.step)), version=book.version + 1,
                       made=book.made + ((event.step, event.checkpoint, sum(1 for p in event.paths if p)),))
    value = Validation(event.step, float(event.loss), event.images, event.checkpoint)
    rest = tuple(v for v in book.validations if v.step != event.step)
    return replace(book, validations=tuple(sorted(rest + (value,), key=lambda v: v.step)),
                   version=book.version + 1)


# ---------------------------------------------------------------- the compare grid
@dataclass(frozen=True)
class CompareRow:
    step: int
    name: str                  # the checkpoint's file name, "" for samples made between checkpoints
    path: str
    validation: float | None
    best: bool
    images: tuple[SampleImage | None, ...]   # one per prompt index (None: no image for that prompt)


def compare_rows(book: SampleBook, checkpoints: Iterable[CheckpointSaved | object], *,
                 base: str = "") -> tuple[CompareRow, ...]:
    """One row per checkpoint (and per sample set made between checkpoints), by step.

    ``checkpoints`` are objects with ``step`` and ``path`` (the events or the cockpit's table rows). A
    sample set or validation value belongs to the checkpoint it names, else to the one at its step.
    Relative image paths are taken relative to ``base`` (the run's output folder)."""
    by_path: dict[str, tuple[int, str]] = {}
    checkpoints = list(checkpoints)
    removed = {str(getattr(c, "path")) for c in checkpoints if getattr(c, "removed", False)}
    for c in checkpoints:
        by_path[str(getattr(c, "path"))] = (int(getattr(c, "step")), str(getattr(c, "path")))
    rows: dict[tuple[int, str], dict] = {}
    step_to_key = {}
    for step, path in sorted(by_path.values()):
        key = (step, path)
        rows[key] = {"set": None, "val": None}
        step_to_key.setdefault(step, key)

    def key_for(step: int, checkpoint: str | None) -> tuple[int, str]:
        if checkpoint and checkpoint in by_path:
            return by_path[checkpoint]
        if step in step_to_key:
            return step_to_key[step]
        key = (step, "")
        rows.setdefault(key, {"set": None, "val": None})
        step_to_key[step] = key
        return key

    for s in book.sets:
        rows[key_for(s.step, s.checkpoint)]["set"] = s
    for v in book.validations:
        rows[key_for(v.step, v.checkpoint)]["val"] = v
    best = book.best
    count = len(book.prompts)
    out = []
    for (step, path), parts in sorted(rows.items()):
        s, v = parts["set"], parts["val"]
        images = tuple(_based(s.image(i), base) if s else None for i in range(count))
        name = Path(path).name + (" (removed)" if path in removed else "") if path else ""
        out.append(CompareRow(step=step, name=name, path=path,
                              validation=v.loss if v else None,
                              best=best is not None and v is not None and v == best, images=images))
    return tuple(out)


def _based(image: SampleImage | None, base: str) -> SampleImage | None:
    if image is None or not image.path or not base or Path(image.path).is_absolute():
        return image
    return replace(image, path=str(Path(base) / image.path))


def format_loss(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if math.isfinite(value) else "nan"
