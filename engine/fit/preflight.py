"""The memory pre-flight: a config's estimate against the device's memory, and what to say about it.

Below ``WARN_RATIO`` of the budget the run fits; up to 100 % it is tight (a yellow warning with the
settings that would bring it down, each with its saving); above, the run is refused unless
``--ignore_memory_check``, naming the settings that would make it fit, each with the estimated peak
after it (``engine.fit.advice``, the search the out-of-memory stop uses too: :func:`advice_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError
from engine.fit.advice import Advice, Family, advise, families, size
from engine.fit.device_memory import DeviceMemory, device_memory
from engine.fit.estimate import MemoryEstimate, Settings, estimate
from engine.fit.shapes import ModelShapes, model_shapes
from engine.optimizers import resolve_type

WARN_RATIO = 0.85
GB = 1e9


class MemoryCheckError(ConfigError):
    """The estimate exceeds the device's memory."""


@dataclass
class MemoryVerdict:
    estimate: MemoryEstimate
    device: DeviceMemory | None
    verdict: str                      # fits | tight | too_big | unknown
    advice: Advice | None = None      # tight: what lowers it; too_big: what fits the budget

    @property
    def ratio(self) -> float | None:
        return self.estimate.peak_bytes / self.device.budget if self.device and self.device.budget > 0 else None

    @property
    def savings(self) -> list[tuple[str, int]]:
        """Each setting that would lower the peak, with its saving (largest first)."""
        return [(" ".join(c.flags), c.saving) for c in self.advice.savings] if self.advice else []

    def summary(self) -> str:
        """``est. peak 9.8 GB of 16.0 GB unified · fits``"""
        peak = f"est. peak {self.estimate.peak_bytes / GB:.1f} GB"
        if self.device is None:
            return f"{peak} · device memory unknown"
        word = {"fits": "fits", "tight": f"tight ({self.ratio:.0%})", "too_big": "does not fit"}[self.verdict]
        return f"{peak} of {self.device.budget / GB:.1f} GB {self.device.label} · {word}"

    def warning(self) -> str | None:
        if self.verdict != "tight":
            return None
        tail = f"; to lower it: {', '.join(c.text() for c in self.advice.savings)}" if self.savings else ""
        return f"memory: {self.summary()}{tail}"

    def refusal(self) -> str:
        line = self.advice.line(f"{size(self.device.budget)} {self.device.label}") if self.advice else ""
        return f"memory: {self.summary()}{'; ' + line if line else ''} — or pass --ignore_memory_check to start anyway"


def _largest_batch(config, plan_dataset, specs=None) -> tuple[int, int, int]:
    """(width, height, batch) with the most pixels per step: the largest bucket of each dataset × its
    batch size; the config's resolution and batch size when the dataset is not scanned. ``specs``: the
    datasets as another config would resolve them (buckets scaled to their resolution, their batch)."""
    best = None
    if plan_dataset is not None:
        for di, ds in enumerate(getattr(plan_dataset, "datasets", [])):
            buckets = [e.bucket for e in plan_dataset.entries if e.dataset_index == di]
            if buckets:
                w, h = max(buckets, key=lambda b: b[0] * b[1])
                batch = ds.batch_size
                if specs is not None:
                    new = specs[di]
                    w, h = w * new.resolution[0] // ds.resolution[0], h * new.resolution[1] // ds.resolution[1]
                    batch = new.batch_size
                cand = (w, h, batch)
                if best is None or w * h * batch > best[0] * best[1] * best[2]:
                    best = cand
    if best is None:
        w, h = config.resolution_wh()
        best = (w, h, config.train_batch_size)
    return best


def _sample_size(config) -> tuple[int, int] | None:
    prompts = getattr(config, "sample_prompts", "") or ""
    if not prompts or not (getattr(config, "sample_every_n_steps", None) or getattr(config, "sample_every_n_epochs",
                                                                                    None)):
        return None
    try:
        from engine.sample.prompts import load_prompts

        items = load_prompts(Path(prompts)).prompts
        return max(((p.width, p.height) for p in items), key=lambda wh: wh[0] * wh[1]) if items else None
    except Exception:  # noqa: BLE001 - a bad prompt file is reported by the sampler, not here
        return (512, 512)


def settings_for(config, plan_dataset=None, device: str = "cpu") -> Settings:
    w, h, batch = _largest_batch(config, plan_dataset)
    entries = list(getattr(plan_dataset, "entries", []) or [])
    flips = 2 if config.flip_aug or any(getattr(e, "flip_aug", False) for e in entries) else 1
    try:
        optimizer = resolve_type(config.optimizer_type, config.use_8bit_adam, config.use_lion_optimizer)
    except ConfigError:
        optimizer = config.optimizer_type
    return Settings(width=w, height=h, batch=batch, gradient_checkpointing=config.gradient_checkpointing,
                    mixed_precision=config.mixed_precision, no_half_vae=config.no_half_vae,
                    network_dim=config.network_dim, network_module=config.network_module,
                    network_args=tuple(config.network_args), train_unet=not config.network_train_text_encoder_only,
                    train_text_encoder=not config.network_train_unet_only, optimizer=optimizer.rsplit(".", 1)[-1],
                    cache_latents=config.cache_latents, sample_size=_sample_size(config), device=device,
                    cached_images=len(entries) * flips, text_chunks=(config.max_token_length or 75) // 75,
                    fp8_base=config.fp8_base, fp8_base_unet=config.fp8_base_unet)


def shapes_for(config) -> ModelShapes | None:
    from engine.models import DEFAULT_SD15_CONFIG_DIR

    config_dir = config.sd_config_dir or DEFAULT_SD15_CONFIG_DIR
    try:
        return model_shapes(config.pretrained_model_name_or_path, config_dir)
    except Exception:  # noqa: BLE001 - unreadable sizes mean no verdict; the model loader reports the file
        return None


def estimate_memory(config, plan_dataset=None, device_type: str = "cpu") -> MemoryEstimate:
    shapes = shapes_for(config)
    if shapes is None:
        raise ConfigError(f"--pretrained_model_name_or_path={config.pretrained_model_name_or_path}: "
                          "cannot read its sizes")
    return estimate(shapes, settings_for(config, plan_dataset, device_type))


def _resolution_value(wh: tuple[int, int]) -> str:
    return str(wh[0]) if wh[0] == wh[1] else f"{wh[0]},{wh[1]}"


def families_for(config, s: Settings, plan_dataset=None) -> list[Family]:
    """The settings that could lower ``config``'s peak, as the run would really take them: a batch size
    or resolution a dataset config sets itself (``batch_size``, ``resolution``) is not offered as the
    flag, which would change nothing; ``--cache_latents`` is not offered beside color_aug/random_crop
    (kohya refuses the two together)."""
    specs = list(getattr(plan_dataset, "datasets", []) or [])
    can_cache = not any(sub.color_aug or sub.random_crop for ds in specs for sub in ds.subsets)
    if not specs:
        return families(s, resolution=config.resolution_wh(), can_cache=can_cache)
    from engine.dataset_sources import resolve_dataset_specs
    from engine.errors import SpykeError
    from engine.plan import dataset_args

    def effect(kind: str, value) -> dict | None:
        changed = (config.replace(train_batch_size=value) if kind == "batch"
                   else config.replace(resolution=_resolution_value(value)))
        try:
            new = resolve_dataset_specs(dataset_args(changed), [])
        except SpykeError:
            return None
        if len(new) != len(specs) or all((a.batch_size, a.resolution) == (b.batch_size, b.resolution)
                                         for a, b in zip(new, specs)):
            return None
        w, h, batch = _largest_batch(config, plan_dataset, new)
        return {"batch": batch} if kind == "batch" else {"width": w, "height": h}

    return families(s, resolution=config.resolution_wh(), effect=effect, can_cache=can_cache)


def advice_for(config, plan_dataset, s: Settings, shapes: ModelShapes, target: int | None) -> Advice:
    """The settings that bring ``config``'s estimated peak to ``target`` bytes (engine.fit.advice)."""
    return advise(shapes, s, families_for(config, s, plan_dataset), target)


def judge(est: MemoryEstimate, device: DeviceMemory | None, shapes: ModelShapes, s: Settings,
          config=None, plan_dataset=None) -> MemoryVerdict:
    if device is None or device.budget <= 0:
        return MemoryVerdict(est, device, "unknown")
    ratio = est.peak_bytes / device.budget
    verdict = "fits" if ratio <= WARN_RATIO else "tight" if ratio <= 1.0 else "too_big"
    if verdict == "fits":
        return MemoryVerdict(est, device, verdict)
    fams = families_for(config, s, plan_dataset) if config is not None else families(s)
    return MemoryVerdict(est, device, verdict, advise(shapes, s, fams, device.budget))


def memory_preflight(config, plan_dataset=None, device: DeviceMemory | None = None) -> MemoryVerdict | None:
    """The estimate and verdict for ``config`` (None when the model's sizes cannot be read: the
    model check reports that). ``device`` defaults to what ``config.device`` would use."""
    shapes = shapes_for(config)
    if shapes is None:
        return None
    device = device if device is not None else device_memory(config.device)
    s = settings_for(config, plan_dataset, device.device if device else "cpu")
    return judge(estimate(shapes, s), device, shapes, s, config, plan_dataset)


def enforce(verdict: MemoryVerdict | None, ignore_memory_check: bool) -> None:
    """Refuse a run whose estimate exceeds the device's memory (one line), unless told to ignore it."""
    if verdict is not None and verdict.verdict == "too_big" and not ignore_memory_check:
        raise MemoryCheckError(verdict.refusal())
