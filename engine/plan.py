"""What a config will do, computed before any model loads (no torch).

The trainer runs exactly this plan, and the cockpit's form shows it as a preview:
images per subset, steps per epoch, total steps, and every checkpoint's file name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.base_weights import multiplier_warnings
from engine.disk_budget import DiskBudget, disk_budget, disk_warning
from engine.kohya.names import checkpoint_filename
from engine.config import TrainConfig
from engine.dataset import DatasetArgs, DatasetPlan, compute_total_steps, load_dataset_plan
from engine.errors import ConfigError
from engine.fit.mps_env import check_mps_watermarks, mps_may_be_used
from engine.fit.preflight import enforce, memory_preflight
from engine.models import DEFAULT_SD15_CONFIG_DIR
from engine.network_args import ignored_args_warnings


@dataclass(frozen=True)
class SubsetSummary:
    image_dir: str
    num_images: int
    num_repeats: int
    is_reg: bool


@dataclass(frozen=True)
class PlannedCheckpoint:
    step: int
    epoch: int
    kind: str            # step | epoch | final
    filename: str
    kept: bool = True    # False: written, then removed by the --save_last_n_* pruning


@dataclass
class RunPlan:
    dataset: DatasetPlan
    subsets: list[SubsetSummary]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    checkpoints: list[PlannedCheckpoint]
    output_dir: Path
    free_bytes: int | None
    warnings: list[str] = field(default_factory=list)
    save_every_n_epochs: int | None = None  # after --save_n_epoch_ratio (kohya sets it from the ratio)
    disk: DiskBudget | None = None   # the bytes the run will write (engine.disk_budget)
    _by_step: dict[int, list[PlannedCheckpoint]] | None = field(default=None, init=False, repr=False, compare=False)
    memory: Any = None   # engine.fit.preflight.MemoryVerdict: estimated peak vs the device; None if unknown
    start: Any = None    # engine.initial_step.StartPoint: --initial_step/--initial_epoch; None starts at step 0

    @property
    def last_step(self) -> int:
        """The global step the run ends at: ``total_steps`` (the schedule's length), or earlier when
        ``--initial_epoch`` without skipping leaves fewer epochs than that."""
        if self.start is None:
            return self.total_steps
        return self.start.last_step(self.total_steps, self.num_epochs, self.steps_per_epoch)

    def checkpoint_at(self, step: int) -> list[PlannedCheckpoint]:
        """The files planned at ``step``, in the order they are written (step, epoch, final)."""
        if self._by_step is None:
            self._by_step = {}
            for c in self.checkpoints:
                self._by_step.setdefault(c.step, []).append(c)
        return self._by_step.get(step, [])

    def surviving_checkpoints(self) -> list[PlannedCheckpoint]:
        """The planned files still there at the end, after the ``--save_last_n_*`` pruning."""
        return [c for c in self.checkpoints if c.kept]


UNSET_WHEN_EMPTY = ("caption_prefix", "caption_suffix", "secondary_separator", "face_crop_aug_range")
PATHS = ("dataset_config", "train_data_dir", "reg_data_dir", "in_json")      # "" is no path


def dataset_args(config: TrainConfig) -> DatasetArgs:
    """The dataset's command-line fallbacks: each DatasetArgs field from the config field of its name
    (kohya's flag names), paths and unset strings as None."""
    names = [f.name for f in fields(DatasetArgs) if f.name not in ("resolution", *PATHS, *UNSET_WHEN_EMPTY)]
    return DatasetArgs(
        resolution=config.resolution_wh(),
        **{key: Path(getattr(config, key)) if getattr(config, key) else None for key in PATHS},
        **{key: getattr(config, key) or None for key in UNSET_WHEN_EMPTY},
        **{key: getattr(config, key) for key in names},
    )


def check_latent_caching(config: TrainConfig, dataset: DatasetPlan, warnings: list[str]) -> None:
    """kohya's rule: cached latents cannot hold random augmentations (and caching to disk implies caching)."""
    if config.cache_latents_to_disk and not config.cache_latents:
        warnings.append("--cache_latents_to_disk is enabled, so --cache_latents is also enabled (kohya behaviour)")
    if not (config.cache_latents or config.cache_latents_to_disk):
        return
    for ds in dataset.datasets:
        for sub in ds.subsets:
            if sub.color_aug or sub.random_crop:
                which = "color_aug" if sub.color_aug else "random_crop"
                raise ConfigError(f"--cache_latents cannot be used with {which} ({sub.where}): cached latents would "
                                  f"freeze one random {'colour' if sub.color_aug else 'crop'}; turn off "
                                  f"--cache_latents{'/--cache_latents_to_disk' if config.cache_latents_to_disk else ''} "
                                  f"or {which} (kohya refuses this too)")


def check_caption_weights(config: TrainConfig, dataset: DatasetPlan) -> None:
    """``--weighted_captions``: every caption's brackets must read as weights before the run starts (kohya
    stops mid-run on the first bad one)."""
    if not config.weighted_captions:
        return
    from engine.sample.weights import parse_weights

    for index, entry in enumerate(dataset.entries):
        sub = dataset.subset_of(index)
        for text, where in ((entry.caption, f"the caption of {entry.path.name}" if entry.caption_from_file else
                             f"class_tokens of {sub.where}"), (sub.caption_prefix, f"caption_prefix of {sub.where}"),
                            (sub.caption_suffix, f"caption_suffix of {sub.where}")):
            try:
                parse_weights(text or "")
            except ValueError as err:
                raise ConfigError(f"--weighted_captions: {where}: {err}; write the weight as (word:1.2), or escape "
                                  "the brackets as \\( \\)") from None


def schedule_checkpoints(config: TrainConfig, total_steps: int, num_epochs: int,
                         steps_per_epoch: int, every_epochs: int | None = None,
                         epoch_offset: int = 0, first_step: int = 0) -> list[PlannedCheckpoint]:
    """kohya's rules: a step file whenever ``global_step % save_every_n_steps == 0``; an epoch file
    after every n-th epoch except the last; the final file at the end. ``epoch_offset``: epochs counted
    before global step 0 (``--initial_epoch`` without skipping); the run then ends when its epochs do.
    ``first_step``: the steps up to it are skipped (``--skip_until_initial_step``), so nothing is saved there."""
    out: list[PlannedCheckpoint] = []
    last = min(total_steps, (num_epochs - epoch_offset) * steps_per_epoch)
    n = config.save_every_n_steps
    if n:
        for step in range(n, last + 1, n):
            epoch = min(num_epochs, epoch_offset + (step - 1) // steps_per_epoch + 1)
            out.append(PlannedCheckpoint(step, epoch, "step", checkpoint_filename(config.output_name, step=step, ext=config.save_model_as)))
    m = every_epochs if every_epochs is not None else config.save_every_n_epochs
    if m:
        for epoch in range(m, num_epochs, m):
            if epoch <= epoch_offset:
                continue
            step = min(last, (epoch - epoch_offset) * steps_per_epoch)
            out.append(PlannedCheckpoint(step, epoch, "epoch", checkpoint_filename(config.output_name, epoch=epoch, ext=config.save_model_as)))
    out = sorted((c for c in out if c.step > first_step), key=lambda c: (c.step, c.kind != "step"))
    out.append(PlannedCheckpoint(last, num_epochs, "final", checkpoint_filename(config.output_name, ext=config.save_model_as)))
    return out


def free_space(path: Path) -> int | None:
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def plan_run(config: TrainConfig) -> RunPlan:
    """Validate the config and scan the dataset; raises a one-line SpykeError on bad input."""
    config.validate()
    check_clip_skip(config.clip_skip, text_encoder_layers(config))
    if mps_may_be_used(config.device):
        check_mps_watermarks()
    dataset = load_dataset_plan(dataset_args(config))
    check_latent_caching(config, dataset, dataset.warnings)
    check_caption_weights(config, dataset)
    memory = memory_preflight(config, dataset)
    enforce(memory, config.ignore_memory_check)
    total_steps, num_epochs = compute_total_steps(
        dataset.batches_per_epoch, config.max_train_epochs, config.max_train_steps,
        config.gradient_accumulation_steps)
    dataset.set_max_train_steps(total_steps)
    steps_per_epoch = -(-dataset.batches_per_epoch // config.gradient_accumulation_steps)
    from engine.train.pruning import every_n_epochs, survivors

    every_epochs = every_n_epochs(config, num_epochs)
    from engine.initial_step import start_point

    start = start_point(config, steps_per_epoch, total_steps)
    checkpoints = schedule_checkpoints(config, total_steps, num_epochs, steps_per_epoch, every_epochs,
                                       *((start.epoch_offset, start.step) if start is not None else ()))
    kept = {id(c) for c in survivors(config, checkpoints, every_epochs)}
    checkpoints = [c if id(c) in kept else dataclasses.replace(c, kept=False) for c in checkpoints]
    subsets: dict[tuple[str, int, bool], int] = {}
    for entry in dataset.entries:
        key = (str(entry.path.parent), entry.num_repeats, entry.is_reg)
        subsets[key] = subsets.get(key, 0) + 1
    free = free_space(Path(config.output_dir))
    disk = disk_budget(config, len(checkpoints), total_steps, num_epochs)
    if (too_full := disk_warning(config, disk, free)) is not None:
        dataset.warnings.append(too_full)
    warnings = list(getattr(dataset, "warnings", [])) + ([missing] if (missing := missing_model(config)) else [])
    if config.skip_until_initial_step and start is None and not config.resume:
        warnings.append("--skip_until_initial_step: no --initial_step or --initial_epoch past the first step, so "
                        "nothing is skipped")
    if memory is not None and (memory_warning := memory.warning()):
        warnings.append(memory_warning)
    return RunPlan(
        dataset=dataset,
        subsets=[SubsetSummary(d, n, r, reg) for (d, r, reg), n in subsets.items()],
        batches_per_epoch=dataset.batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        num_epochs=num_epochs,
        checkpoints=checkpoints,
        output_dir=Path(config.output_dir),
        free_bytes=free,
        warnings=warnings + loss_warnings(config) + format_warnings(config) + multiplier_warnings(
            config.base_weights, config.base_weights_multiplier) + ignored_args_warnings(
            config.network_args, config.network_module, alpha=config.network_alpha,
            network_dropout=config.network_dropout),
        memory=memory,
        save_every_n_epochs=every_epochs,
        disk=disk,
        start=start,
    )


def loss_warnings(config: TrainConfig) -> list[str]:
    """kohya's warnings about loss options that train but probably not as meant."""
    if config.zero_terminal_snr and not config.v_parameterization:
        return ["--zero_terminal_snr is enabled, but --v_parameterization is not: training will be unexpected "
                "(kohya's warning)"]
    return []


def format_warnings(config: TrainConfig) -> list[str]:
    """kohya writes no metadata into a .ckpt/.pt LoRA: say so when metadata was asked for."""
    if config.save_model_as not in ("ckpt", "pt"):
        return []
    asked = [f"--{f}" for f in ("training_comment", "metadata_title", "metadata_author", "metadata_description",
                                "metadata_license", "metadata_tags", "metadata_usage_hint", "metadata_thumbnail",
                                "metadata_merged_from", "metadata_trigger_phrase", "metadata_preprocessor",
                                "metadata_is_negative_embedding") if getattr(config, f, None)]
    if not asked:
        return []
    return [f"{', '.join(asked)}: not written: a --save_model_as={config.save_model_as} file holds the weights "
            "only, no metadata (as in kohya); use --save_model_as=safetensors to keep them"]


def missing_model(config: TrainConfig) -> str | None:
    """A one-line problem when the base model path does not exist (checked before anything loads)."""
    model = Path(config.pretrained_model_name_or_path).expanduser()
    if model.exists():
        return None
    return (f"--pretrained_model_name_or_path={model}: not found; pass a diffusers folder or an SD1.x "
            ".safetensors file")


def text_encoder_layers(config: TrainConfig) -> int | None:
    """The text encoder's layer count from the config it will be built from, without loading it:
    a diffusers folder's ``text_encoder/config.json``, or for a single file the SD config folder's
    (``--sd_config_dir``, default the shipped SD1.5 one). None when that file cannot be read."""
    model = Path(config.pretrained_model_name_or_path).expanduser()
    if model.is_dir():
        folder = model
    else:
        folder = Path(config.sd_config_dir).expanduser() if config.sd_config_dir else DEFAULT_SD15_CONFIG_DIR
    try:
        layers = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None


def check_clip_skip(clip_skip: int | None, layers: int | None) -> None:
    """``--clip_skip=n`` takes the n-th last layer's output, so n may be at most the layer count."""
    if clip_skip is not None and layers is not None and clip_skip > layers:
        raise ConfigError(f"--clip_skip={clip_skip}: the text encoder has {layers} layers; use 1..{layers}")
