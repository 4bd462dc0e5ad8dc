"""The step's host reads: on MPS and CUDA every read of a tensor's value (``float(t)``, ``.item()``,
``bool(t)``) waits for the device to finish the work queued so far, so a step reads once.

The last batch of a step is backpropagated unread, and its loss and the gradient norm come back together
in one transfer (:func:`finish_read`) that serves the NaN guard and the step event alike. Batches before
the last (gradient accumulation) and fp16 runs, whose grad scaler must not see a non-finite loss's
gradients, read each loss before its backward pass, as the stop at the first non-finite loss requires.
A non-finite last loss is backpropagated before it is seen; its gradients are dropped with the update, so
the weights, the optimizer and the random generators end as they would have without that backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepLoss:
    value: float                  # the mean over the step's batches of the losses read so far
    nonfinite: str | None = None  # "loss": a read loss was not finite (it was not backpropagated)
    pending: object = None        # the last batch's loss tensor: backpropagated, not yet read
    batches: int = 1


def finish_read(loss: StepLoss, norm) -> tuple[float, str | None]:
    """(the step's mean loss, None | "loss" | "gradient") from one host read of the pending loss and the
    gradient norm (``norm`` None: no gradient check, as under fp16)."""
    import torch

    parts = [t.detach().float().reshape(1) for t in (loss.pending, norm) if t is not None]
    if not parts:
        return loss.value, None
    values = torch.cat([p.to(parts[0].device) for p in parts]).tolist()   # the one host read
    value = loss.value
    if loss.pending is not None:
        last = values.pop(0)
        if not math.isfinite(last):
            return value, "loss"
        value += last / loss.batches
    if norm is not None and not math.isfinite(values[0]):
        return value, "gradient"
    return value, None
