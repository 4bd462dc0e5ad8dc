"""How many bytes a run will write, computed at plan time (no torch, no weights loaded).

The LoRA's parameter count comes from the base model's component configs (a diffusers folder's
``unet/config.json`` and ``text_encoder/config.json``, or the SD config folder a single file is
built from): kohya's default ``networks.lora`` puts a rank-``d`` adapter (``lora_down``: in x d,
``lora_up``: d x out, and an ``alpha`` scalar) on every Linear / 1x1 Conv of the UNet's
transformer blocks and of the text encoder's attention and MLP layers, so a module costs
``(in + out) * d + 1`` parameters. At dim 32 this gives SD1.5's well-known 37.7 MB fp16 file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.models import DEFAULT_SD15_CONFIG_DIR
from engine.units import format_bytes

HEADER_BYTES_PER_TENSOR = 160      # a safetensors header entry: key, dtype, shape, offsets
METADATA_BYTES = 64 * 1024          # kohya ss_* metadata (tag frequencies, dataset dirs) with room to spare
# A torch.save (.ckpt/.pt) file: a zip entry, pickle record and 64-byte alignment per tensor (~360 bytes
# measured), no metadata; plus the archive's own few records.
TORCH_BYTES_PER_TENSOR = 512
TORCH_ARCHIVE_BYTES = 4 * 1024


def file_overhead(tensors: int, save_model_as: str | None = "safetensors") -> int:
    """A LoRA file's bytes beyond its tensor data, for kohya's file format."""
    if save_model_as in ("ckpt", "pt"):
        return tensors * TORCH_BYTES_PER_TENSOR + TORCH_ARCHIVE_BYTES
    return tensors * HEADER_BYTES_PER_TENSOR + METADATA_BYTES
BYTES_PER_PARAM = {"fp16": 2, "bf16": 2, "float": 4, None: 4}
# Optimizer state in bytes per trained parameter, as torch.save writes it (AdamW: exp_avg + exp_avg_sq).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "sgdnesterov": 4,
                         "sgd": 4, "adafactor": 4, "prodigy": 16, "dadaptation": 12, "dadaptadam": 12}
SAMPLE_PNG_BYTES_512 = 512 * 1024   # a 512 x 512 sample PNG, about 0.5 MB; scaled by pixel count
FREE_SPACE_MARGIN = 16 * 1024 * 1024


@dataclass(frozen=True)
class LoraSize:
    modules: int
    params: int                     # including the alpha scalars


def _read(folder: Path, component: str) -> dict | None:
    try:
        data = json.loads((folder / component / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value or 1)] * n


def unet_lora_size(unet: dict, dim: int) -> LoraSize:
    """Adapters on every transformer block's attn1/attn2 q,k,v,out, ff.net.0.proj (GEGLU: C -> 8C),
    ff.net.2 (4C -> C) and each attention's proj_in/proj_out (C -> C)."""
    channels = list(unet["block_out_channels"])
    n = len(channels)
    x = int(unet.get("cross_attention_dim", 768) if not isinstance(unet.get("cross_attention_dim"), list)
            else unet["cross_attention_dim"][0])
    per_layer = int(unet.get("layers_per_block", 2)) if not isinstance(unet.get("layers_per_block"), list) \
        else None
    depth = _per_block(unet.get("transformer_layers_per_block", 1), n)
    attentions: list[tuple[int, int]] = []   # (channels, transformer layers)
    for i, kind in enumerate(unet.get("down_block_types", [])):
        if "CrossAttn" in kind:
            attentions += [(channels[i], depth[i])] * (per_layer if per_layer is not None else 2)
    if "CrossAttn" in str(unet.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        attentions.append((channels[-1], depth[-1]))
    rev, rev_depth = channels[::-1], depth[::-1]
    for i, kind in enumerate(unet.get("up_block_types", [])):
        if "CrossAttn" in kind:
            attentions += [(rev[i], rev_depth[i])] * ((per_layer if per_layer is not None else 2) + 1)
    modules = params = 0
    for c, layers in attentions:
        modules += 2 + 10 * layers
        params += (4 * c + layers * (28 * c + 2 * x)) * dim
    return LoraSize(modules, params + modules)


def text_encoder_lora_size(te: dict, dim: int) -> LoraSize:
    """Adapters on every layer's q/k/v/out_proj (H -> H), fc1 (H -> I) and fc2 (I -> H)."""
    h, i, layers = int(te["hidden_size"]), int(te["intermediate_size"]), int(te["num_hidden_layers"])
    modules = 6 * layers
    return LoraSize(modules, layers * (10 * h + 2 * i) * dim + modules)


def config_folder(config) -> Path:
    model = Path(config.pretrained_model_name_or_path).expanduser()
    if model.is_dir():
        return model
    return Path(config.sd_config_dir).expanduser() if config.sd_config_dir else DEFAULT_SD15_CONFIG_DIR


def lora_size(config) -> LoraSize | None:
    """The run's LoRA size from the base model's configs; None when they cannot be read."""
    folder = config_folder(config)
    dim = int(config.network_dim)
    total = LoraSize(0, 0)
    if getattr(config, "network_module", "networks.lora") == "lycoris.kohya":
        return _lycoris_size(config, folder)
    try:
        if not config.network_train_text_encoder_only:
            if (unet := _read(folder, "unet")) is None:
                return None
            u = unet_lora_size(unet, dim)
            total = LoraSize(total.modules + u.modules, total.params + u.params)
        if not config.network_train_unet_only:
            if (te := _read(folder, "text_encoder")) is None:
                return None
            t = text_encoder_lora_size(te, dim)
            total = LoraSize(total.modules + t.modules, total.params + t.params)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return total


def _lycoris_size(config, folder: Path) -> LoraSize | None:
    """A ``lycoris.kohya`` network's size (engine.fit.lycoris_size); about 3 tensors a module."""
    from engine.errors import ConfigError
    from engine.fit.lycoris_size import lycoris_param_count

    unet, te = _read(folder, "unet"), _read(folder, "text_encoder")
    if unet is None or te is None:
        return None
    try:
        modules, params = lycoris_param_count(config.network_args, int(config.network_dim), config.network_alpha,
                                              unet, te, train_unet=not config.network_train_text_encoder_only,
                                              train_text_encoder=not config.network_train_unet_only)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError, StopIteration):
        return None
    return LoraSize(modules, params)


def checkpoint_bytes(size: LoraSize, save_precision: str | None, save_model_as: str | None = "safetensors") -> int:
    return size.params * BYTES_PER_PARAM.get(save_precision, 4) + file_overhead(3 * size.modules, save_model_as)


def state_bytes(size: LoraSize, optimizer_type: str | None) -> int:
    """A training state: the LoRA in fp32, the optimizer state, and small files (scheduler, rng, progress)."""
    per_param = OPTIMIZER_STATE_BYTES.get((optimizer_type or "adamw").lower().replace("_", ""), 8)
    return size.params * (4 + per_param) + 3 * size.modules * HEADER_BYTES_PER_TENSOR + 64 * 1024


def sample_bytes(config, total_steps: int, num_epochs: int) -> int:
    """Sample images, if the run makes any (about 0.5 MB per 512 px PNG)."""
    every_steps = getattr(config, "sample_every_n_steps", None) or 0
    every_epochs = getattr(config, "sample_every_n_epochs", None) or 0
    rounds = (total_steps // every_steps if every_steps else 0) + (num_epochs // every_epochs if every_epochs else 0)
    if not rounds:
        return 0
    prompts = 1
    if (path := getattr(config, "sample_prompts", None)):
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
            prompts = max(1, sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#")))
        except OSError:
            pass
    w, h = config.resolution_wh()
    return rounds * prompts * int(SAMPLE_PNG_BYTES_512 * (w * h) / (512 * 512))


@dataclass(frozen=True)
class DiskBudget:
    checkpoints: int
    checkpoint_bytes: int
    states: int
    state_bytes: int
    samples_bytes: int

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint_bytes + self.states * self.state_bytes + self.samples_bytes


def disk_budget(config, n_checkpoints: int, total_steps: int, num_epochs: int) -> DiskBudget | None:
    size = lora_size(config)
    if size is None:
        return None
    # --save_state writes a state with every checkpoint, the final one included (its folder has no step).
    # --save_state_on_train_end alone: the final state only.
    states = n_checkpoints if config.save_state else 1 if getattr(config, "save_state_on_train_end", False) else 0
    return DiskBudget(n_checkpoints, checkpoint_bytes(size, config.save_precision, getattr(config, "save_model_as", "safetensors")), states,
                      state_bytes(size, config.optimizer_type), sample_bytes(config, total_steps, num_epochs))


def disk_warning(config, budget: DiskBudget | None, free: int | None) -> str | None:
    """A plan warning when the run's files will not all fit in --output_dir's free space."""
    if budget is None or free is None or budget.total + FREE_SPACE_MARGIN <= free:
        return None
    parts = [f"{budget.checkpoints} checkpoint{'s' if budget.checkpoints != 1 else ''} x "
             f"{format_bytes(budget.checkpoint_bytes)}"]
    if budget.states:
        parts.append(f"{budget.states} state{'s' if budget.states != 1 else ''} x {format_bytes(budget.state_bytes)}")
    if budget.samples_bytes:
        parts.append(f"samples {format_bytes(budget.samples_bytes)}")
    return (f"--output_dir={config.output_dir}: the run will write about {format_bytes(budget.total)} "
            f"({', '.join(parts)}) but only {format_bytes(free)} is free; free space, save less often "
            "(--save_every_n_steps), or choose another --output_dir")
