"""Everything a run trains with, built once: the device and precision, the base models in place,
the LoRA injected (``engine.lora``), gradient checkpointing, the parameter groups, and the
optimizer with its learning-rate schedule (:func:`build_optimizer`, the one place that picks them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import TrainConfig
from engine.errors import ConfigError


def dtype_of(name: str | None):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "", torch.float32)


@dataclass
class Models:
    accelerator: Any
    device: Any
    unet: Any
    vae: Any
    te: Any
    tokenizer: Any
    network: Any                    # engine.lora.LoraNetwork, engine.dylora.DyLoraNetwork or engine.lycoris_net.LycorisNet
    weight_dtype: Any               # the frozen base weights' dtype
    vae_dtype: Any
    save_dtype: Any
    train_unet: bool
    train_te: bool                  # the text encoder's LoRA is trained (and its forward keeps grads)
    unet_lr: float
    te_lr: float
    notes: list[str] = field(default_factory=list)   # info lines for the log (network notes, weights loaded)
    attention: Any = None           # engine.attention_probe.AttentionReport: the attention kernel that runs


def setup_models(cfg: TrainConfig, base, device, seed: int) -> Models:
    """Place the base models on ``device`` in the training dtype and inject the LoRA (seeded)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from engine.lora import apply_lora
    from engine.network_args import parse_network_args

    device_type = device.type
    if cfg.mixed_precision == "fp16" and device_type == "cpu":
        raise ConfigError("--mixed_precision=fp16 needs a CUDA or MPS device; use bf16 or no on the CPU")
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device_type == "cpu")
    device = accelerator.device if device_type != "cpu" else device
    set_seed(seed)

    from engine.attention_probe import attention_report
    from engine.models import fp8_base_plan, full_precision_dtype, load_external_vae

    weight_dtype = dtype_of(cfg.mixed_precision)
    full_dtype = full_precision_dtype(cfg.full_fp16, cfg.full_bf16, device_type)
    fp8 = fp8_base_plan(cfg.fp8_base, cfg.fp8_base_unet, device, cfg.network_module, weight_dtype)
    unet, vae, te = base.unet, base.vae, base.text_encoder
    if cfg.vae:  # kohya's --vae: the external VAE replaces the base model's
        vae = load_external_vae(cfg.vae, sd_config_dir=Path(cfg.sd_config_dir) if cfg.sd_config_dir else None)
    notes: list[str] = []
    if cfg.base_weights:  # kohya's --base_weights: merged into the float32 base before the network is made
        from engine.base_weights import merge_base_weights

        notes += merge_base_weights(cfg.base_weights, cfg.base_weights_multiplier, unet, te)
    unet_lr, te_lr = cfg.effective_unet_lr(), cfg.effective_text_encoder_lr()
    train_te = not cfg.network_train_unet_only
    train_unet = not cfg.network_train_text_encoder_only and unet_lr > 0
    if cfg.network_module == "lycoris.kohya":  # the LyCORIS library's own network (engine.lycoris_net)
        from engine.lycoris_net import apply_lycoris

        network = apply_lycoris(unet, te, dim=cfg.network_dim, alpha=cfg.network_alpha, network_args=cfg.network_args,
                                dropout=cfg.network_dropout, train_unet=not cfg.network_train_text_encoder_only,
                                unet_frozen=not train_unet, train_text_encoder=train_te, text_encoder_frozen=te_lr == 0)
        notes += network.notes
    elif cfg.network_module == "networks.dylora":
        from engine.dylora import apply_dylora

        network_args = parse_network_args(cfg.network_args, cfg.network_module, dim=cfg.network_dim,
                                          alpha=cfg.network_alpha)
        network = apply_dylora(unet, te, dim=cfg.network_dim, alpha=cfg.network_alpha, network_args=network_args,
                               train_unet=train_unet, train_text_encoder=train_te, text_encoder_frozen=te_lr == 0)
        notes.append(f"DyLoRA: each module trains a random block of {network.unit} of its {network.dim} ranks "
                     "per step (kohya's networks.dylora)")
    else:
        network = apply_lora(unet, te, dim=cfg.network_dim, alpha=cfg.network_alpha, train_unet=train_unet,
                             train_text_encoder=train_te, text_encoder_frozen=te_lr == 0,
                             network_args=parse_network_args(cfg.network_args, cfg.network_module,
                                                             dim=cfg.network_dim, alpha=cfg.network_alpha),
                             dropout=cfg.network_dropout)
    train_te = train_te and te_lr > 0
    # Frozen base weights in the training dtype; LoRA weights stay fp32 (kohya does the same).
    unet.to(device, dtype=weight_dtype)
    te.to(device, dtype=weight_dtype)
    vae_dtype = torch.float32 if (cfg.no_half_vae or cfg.mixed_precision == "no") else weight_dtype
    vae.to(device, dtype=vae_dtype)
    network.place(device)
    vae.requires_grad_(False)
    vae.eval()
    attention = attention_report(unet, device, weight_dtype)   # the kernel SDPA picks here, for these shapes
    for p in network.unet_params + network.text_encoder_params:
        p.data = p.data.float()
    if fp8 is not None:
        notes.append(_store_base_in_float8(cfg, network, unet, te, fp8, weight_dtype))
    if cfg.network_weights:  # kohya's network.load_weights: start from an existing LoRA
        from engine.network_weights import load_network_weights

        notes.append(load_network_weights(network, cfg.network_weights))
    if full_dtype is not None:  # kohya's --full_fp16/--full_bf16: the LoRA weights train in that dtype too
        network.param_dtype = full_dtype
        if cfg.full_fp16:
            _allow_fp16_unscale(accelerator)
        for p in network.unet_params + network.text_encoder_params:
            p.data = p.data.to(full_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.2x
                te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unet.train()
    te.train(train_te)
    return Models(accelerator=accelerator, device=device, unet=unet, vae=vae, te=te, tokenizer=base.tokenizer,
                  network=network, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
                  save_dtype=dtype_of(cfg.save_precision), train_unet=train_unet, train_te=train_te,
                  unet_lr=unet_lr, te_lr=te_lr, notes=notes, attention=attention)


def _store_base_in_float8(cfg: TrainConfig, network, unet, te, fp8, weight_dtype) -> str:
    """kohya's --fp8_base (U-Net and text encoder) / --fp8_base_unet (the U-Net only): the frozen base weights
    in float8 (``fp8``: an engine.models.Float8Plan), the network's own weights untouched; the line saying so."""
    from engine.models import store_in_float8
    from engine.units import format_bytes

    keep = {id(p) for p in network.unet_params + network.text_encoder_params}
    keep |= {id(p) for m in getattr(network, "modules", ()) for p in m.down_params + m.up_params}
    parts = [("U-Net", unet)] + ([("text encoder", te)] if cfg.fp8_base and not cfg.fp8_base_unet else [])
    size = sum(store_in_float8(model, fp8.dtype, keep=keep, compute_dtype=weight_dtype,
                               norms_in_compute_dtype=not fp8.norms_in_float8, embeddings_in_compute_dtype=True)
               for _, model in parts)
    compute = str(weight_dtype).removeprefix("torch.")
    line = (f"{'--fp8_base' if cfg.fp8_base else '--fp8_base_unet'}: the base {' and '.join(n for n, _ in parts)} "
            f"weights are stored in {str(fp8.dtype).removeprefix('torch.')} ({format_bytes(size)}) and computed "
            f"in {compute} under autocast")
    if not fp8.norms_in_float8:
        line += (f"; this device's norm kernels take no float8, so the norm layers hold the float8-rounded values "
                 f"in {compute}")
    return line


def _allow_fp16_unscale(accelerator) -> None:
    """kohya's patch for --full_fp16: the grad scaler unscales fp16 gradients (torch refuses by default)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not hasattr(scaler, "_unscale_grads_"):
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - kohya forces allow_fp16
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def _lora_groups(modules, lr: float, ratio: float | None, name: str) -> list[dict]:
    """kohya's ``assemble_params``: one group, or with a LoRA+ ratio the lora_down group and a
    ``"<name> plus"`` group of the lora_up weights at ``lr × ratio``; groups at LR 0 are left out."""
    down = [p for m in modules for p in (m.down_params if ratio is not None else m.down_params + m.up_params)
            if p.requires_grad]
    up = [p for m in modules for p in m.up_params if p.requires_grad] if ratio is not None else []
    groups = []
    for params, group_lr, group_name in ((down, lr, name), (up, lr * (ratio or 0.0), f"{name} plus")):
        if params and group_lr:
            groups.append({"params": params, "lr": group_lr, "name": group_name})
    return groups


def param_groups(models: Models) -> list[dict]:
    """The optimizer's parameter groups: ``unet`` (or ``unet_block<i>`` per kohya block with block LR
    weights, each at unet_lr × weight), then ``text_encoder``; each with a ``… plus`` group of its
    lora_up weights under LoRA+ (kohya's descriptions, ``textencoder`` spelled as the engine's group)."""
    net = models.network
    if callable(getattr(net, "param_groups", None)):   # lycoris.kohya: LyCORIS's prepare_optimizer_params
        groups = net.param_groups(models.unet_lr if models.train_unet else 0.0, models.te_lr if models.train_te else 0.0)
        if not groups:
            raise ConfigError("nothing to train: unet_lr and text_encoder_lr are both 0 (or the network is frozen)")
        return groups
    groups: list[dict] = []
    unet_modules = [m for m in net.modules if m.part == "unet"]
    if models.train_unet and unet_modules:
        if net.block_lr_weight is not None:
            blocks: dict[int, list] = {}
            for m in unet_modules:
                blocks.setdefault(m.block, []).append(m)
            for idx, block in blocks.items():
                groups += _lora_groups(block, models.unet_lr * net.block_lr_weight[idx], net.loraplus_unet_ratio,
                                       f"unet_block{idx}")
        else:
            groups += _lora_groups(unet_modules, models.unet_lr, net.loraplus_unet_ratio, "unet")
    te_modules = [m for m in net.modules if m.part == "text_encoder"]
    if models.train_te and te_modules:
        groups += _lora_groups(te_modules, models.te_lr, net.loraplus_text_encoder_ratio, "text_encoder")
    if not groups:
        raise ConfigError("nothing to train: unet_lr and text_encoder_lr are both 0 (or the network is frozen)")
    return groups


def build_optimizer(cfg: TrainConfig, groups: list[dict], total_steps: int, device_type: str):
    """The optimizer kohya's names and ``--optimizer_args`` ask for over ``groups`` (an
    ``engine.optimizers.BuiltOptimizer``), its learning-rate schedule over ``total_steps``, and the
    (level, text) notes both have for the log."""
    from engine.optimizers import build_optimizer as build
    from engine.schedules import build_scheduler

    built = build(cfg, groups, device_type)
    scheduler, notes = build_scheduler(cfg, built, total_steps)
    return built, scheduler, built.messages + notes
