"""Out of memory during a step or a save: free what can be freed, keep the run resumable, say what fits.

Recognised: ``torch.OutOfMemoryError`` (CUDA), the ``RuntimeError`` MPS raises ("MPS backend out of
memory"), the CPU allocator's "DefaultCPUAllocator: can't allocate memory", and Python's MemoryError.

The state written is the one of the last completed step. An out-of-memory error in the forward or
backward pass leaves the weights, the optimizer and the scheduler as that step left them; the
gradients are dropped, and the random generators, which the failed step had already drawn from, are
rewound to where they stood when it began (:meth:`OomGuard.step_starts`). So resuming from that
state is bit-exact with a run that never failed (on the same device and settings). Not covered: an
error inside ``optimizer.step()`` itself, which may have updated some weights before it failed
(rare: the optimizer's state is allocated at the first step, long before the usual failure).
"""

from __future__ import annotations

import gc
import sys

from engine.errors import SpykeError
from engine.events import PhaseChanged
from engine.units import format_bytes

KNOWN_PHRASES = ("CUDA out of memory", "MPS backend out of memory", "DefaultCPUAllocator: can't allocate memory")
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


class OutOfMemory(SpykeError):
    """The run stopped because the device (or the machine) ran out of memory; ``fits`` holds the changes
    the line names (``--gradient_checkpointing (est. peak 6.1 GB, −1.4 GB)``; several flags in one when
    only a combination fits; ``engine.fit.advice``)."""

    def __init__(self, message: str, fits: list[str] | None = None) -> None:
        super().__init__(message)
        self.fits = list(fits or [])


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
            return True
    except ImportError:  # pragma: no cover - torch is always there while training
        pass
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS)


def summary(err: BaseException) -> str:
    """The error's first sentence, short (CUDA's message goes on about the allocator's settings)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for phrase in KNOWN_PHRASES:
        if phrase in text:
            return phrase
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 100 else text[:99] + "…"


def fit_advice(config, plan_dataset, device_type: str) -> tuple[str, list[str]]:
    """The line's advice and the suggestions it names (``RunFinished.fits``): the settings whose estimated
    peak fits the memory the run could use on this device (``engine.fit``: one change if one suffices,
    else the smallest combination), each with the peak after it. Where the estimate is already under
    that budget (the estimator reads this device low), they aim at 15 % below the estimate. Without the
    model's sizes or the device's budget: the settings known to lower the peak, unsized."""
    from engine.fit import preflight
    from engine.fit.advice import size
    from engine.fit.estimate import estimate

    try:
        shapes = preflight.shapes_for(config)
        if shapes is not None:
            s = preflight.settings_for(config, plan_dataset, device_type)
            device = preflight.device_memory(device_type, in_use=True)
            peak = estimate(shapes, s).peak_bytes
            target, budget = None, ""
            if device is not None and device.budget > 0:
                budget = f"{size(device.budget)} {device.label}"
                target = device.budget
                if peak <= device.budget:
                    target = int(peak * preflight.WARN_RATIO)
                    budget = f"{size(target)} (15 % under the estimate {size(peak)}, which read under {budget})"
            advice = preflight.advice_for(config, plan_dataset, s, shapes, target)
            if (line := advice.line(budget)):
                return line, [c.text() for c in advice.suggestions()]
    except Exception:  # noqa: BLE001 - advice must never hide the out-of-memory line itself
        pass
    fits = static_advice(config, device_type)
    return (f"to lower it, try: {', '.join(fits)}" if fits else ""), fits


def static_advice(config, device_type: str) -> list[str]:
    """Settings that lower peak memory and are not already set (when the estimator cannot size them)."""
    out: list[str] = []
    if not config.gradient_checkpointing:
        out.append("--gradient_checkpointing")
    if not (config.cache_latents or config.cache_latents_to_disk):
        out.append("--cache_latents")
    if config.train_batch_size > 1:
        out.append("--train_batch_size=1")
    w, h = config.resolution_wh()
    if max(w, h) > 256:
        out.append(f"a lower --resolution (now {w}x{h})" if w != h else f"a lower --resolution (now {w})")
    if device_type in ("cuda", "mps") and config.mixed_precision in (None, "no"):
        out.append("--mixed_precision=bf16" if device_type == "cuda" else "--mixed_precision=fp16")
    if not config.network_train_unet_only:
        out.append("--network_train_unet_only")
    return out


def peak_memory(device_type: str) -> str:
    """The peak seen: the device's allocator peak on CUDA, else the process's peak RSS."""
    from engine.devices import read_memory

    reading = read_memory(device_type)
    if reading.peak:
        total = f" of {format_bytes(reading.device_total)}" if reading.device_total else ""
        return f"peak {format_bytes(reading.peak)}{total} on {device_type}"
    rss = reading.rss
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = max(rss, maxrss if sys.platform == "darwin" else maxrss * 1024)
    except (ImportError, OSError, ValueError):
        pass
    extra = f", {format_bytes(reading.reserved)} driver-allocated" if device_type == "mps" and reading.reserved \
        else ""
    return f"peak RSS {format_bytes(rss)} of {format_bytes(reading.sys_total)} RAM{extra} on {device_type}"


def free_memory(optimizer, device_type: str) -> None:
    if optimizer is not None:
        try:
            optimizer.zero_grad(set_to_none=True)
        except Exception:  # noqa: BLE001 - freeing is best effort
            pass
    gc.collect()
    from engine.devices import empty_cache

    empty_cache(device_type)


class OomGuard:
    """Remembers where each step began (its step count and random generators) so an out-of-memory
    error can be turned into a resumable stop; see the module docstring for exactness."""

    AFTER_STEP = {"saving": "the save", "sampling": "the samples", "validating": "the validation"}

    def __init__(self, job) -> None:
        self.job = job
        self.step_start: int | None = None
        self.rng = None
        self.after_step: str | None = None  # the last of AFTER_STEP's phases begun since the step began

    def __call__(self, event) -> None:
        """An event sink: which work after the step is under way."""
        if isinstance(event, PhaseChanged) and event.phase in self.AFTER_STEP:
            self.after_step = event.phase

    def step_starts(self) -> None:
        from engine.state import capture_rng

        job = self.job
        self.step_start = job.counters.global_step
        self.after_step = None
        self.rng = capture_rng(job.noise_gen, job.data_rng, job.device_type)

    def stop(self, what: str) -> OutOfMemory:
        """After the error was caught (its frames released): free memory, write the state, build the error."""
        job = self.job
        c = job.counters
        failed_in_step = self.step_start is not None and c.global_step == self.step_start
        failed = c.global_step + 1 if failed_in_step else c.global_step
        after = self.AFTER_STEP.get(self.after_step or "saving")
        where = f"step {failed}/{job.plan.total_steps}" if failed_in_step else f"{after} after step {failed}"
        free_memory(job.optimizer, job.device_type)
        peak = peak_memory(job.device_type)
        if failed_in_step and self.rng is not None:
            from engine.state import restore_rng

            restore_rng(self.rng, job.noise_gen, job.data_rng)
        state = ""
        if c.global_step > 0 and job.saver.state_step != c.global_step:
            try:
                state = f"; state of step {c.global_step} saved to {job.saver.save_training_state()}"
            except SpykeError as err:
                state = f"; no state written ({err})"
            except Exception as err:  # noqa: BLE001 - out of memory again while saving: say so, stop
                state = f"; no state written ({type(err).__name__})"
        elif c.last_state_dir is not None:
            state = f"; last state: {c.last_state_dir}"
        advice, fits = fit_advice(job.cfg, job.plan.dataset, job.device_type)
        return OutOfMemory(f"out of memory at {where} ({what}; {peak}){state}{'; ' + advice if advice else ''}", fits)
