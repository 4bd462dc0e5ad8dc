"""Leave training exactly as it was: RNG states and train/eval modes around sampling.

Sampling draws its noise from its own ``torch.Generator``, but anything else it calls
might touch a global generator, and it switches the models to eval mode. ``preserved``
saves torch's CPU generator, every CUDA device's (when CUDA is available), MPS's (when
available), Python's ``random`` and NumPy's global state, and every submodule's
``training`` flag, and puts them all back on the way out, also after an error.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.devices import cuda_available, mps_available


@dataclass
class RngStates:
    torch_cpu: Any
    cuda: Any
    mps: Any
    python: Any
    numpy: Any


def capture_rng() -> RngStates:
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if cuda_available() else None
    mps = torch.mps.get_rng_state() if mps_available() else None
    return RngStates(torch.get_rng_state(), cuda, mps, random.getstate(), np.random.get_state())


def restore_rng(states: RngStates) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states.torch_cpu)
    if states.cuda is not None:
        torch.cuda.set_rng_state_all(states.cuda)
    if states.mps is not None:
        torch.mps.set_rng_state(states.mps)
    random.setstate(states.python)
    np.random.set_state(states.numpy)


def capture_modes(modules: Iterable[Any]) -> list[tuple[Any, bool]]:
    """Every submodule's ``training`` flag (models may mix train and eval submodules)."""
    return [(sub, sub.training) for module in modules if module is not None for sub in module.modules()]


def restore_modes(modes: list[tuple[Any, bool]]) -> None:
    for sub, training in modes:
        sub.training = training


@contextmanager
def preserved(modules: Iterable[Any]) -> Iterator[None]:
    """Restore the RNG states and the modules' train/eval modes when the block ends."""
    modules = list(modules)
    states = capture_rng()
    modes = capture_modes(modules)
    try:
        yield
    finally:
        restore_modes(modes)
        restore_rng(states)
