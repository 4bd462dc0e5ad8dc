"""The validation split: which images of a subset are held out for the validation loss.

kohya sd-scripts (v0.10, ``train_util.split_train_val``) splits each non-regularisation subset
of a dataset with ``validation_split`` > 0: the subset's image list is shuffled with
``random.seed(validation_seed)`` (a fresh seed per subset), the first
``ceil(n * (1 - validation_split))`` images are trained on and the rest are the validation
images (each once: no repeats). Regularisation subsets are never split. The training set
shrinks, so the batches per epoch and the step count do too.

Departures, both so that a held-out image is never trained on:

* kohya builds its training and validation datasets separately and takes the validation
  images as the last ``round(n * validation_split)`` of the shuffle, which can overlap the
  training part (n=3, split 0.5: one image in both). Here the validation images are exactly
  the ones not trained on.
* without ``validation_seed`` kohya shuffles with the global RNG (a different state for the
  two datasets); here the run's ``--seed`` is the split's seed (0 when the run has none yet).

The shuffle is ``random.Random(seed).shuffle`` of the subset's sorted image list, the same
permutation kohya's ``random.seed(seed); random.shuffle(...)`` makes of a list of that length.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def train_count(n: int, validation_split: float) -> int:
    """How many of a subset's ``n`` images are trained on (kohya: ``ceil(n * (1 - split))``)."""
    if validation_split <= 0:
        return n
    return min(n, math.ceil(n * (1 - validation_split)))


def split_train_val(items: Sequence[T], validation_split: float, seed: int) -> tuple[list[T], list[T]]:
    """(trained on, held out) for one subset's images, in the subset's order within each part."""
    items = list(items)
    if validation_split <= 0 or not items:
        return items, []
    order = list(range(len(items)))
    random.Random(int(seed)).shuffle(order)
    keep = train_count(len(items), validation_split)
    held = set(order[keep:])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
