"""kohya sd-scripts' ``networks.dylora`` for SD1.5: DyLoRA, a LoRA whose lower ranks work on their own.

peft has no DyLoRA layer, so this is a small module of its own, laid out as kohya's ``DyLoRAModule``:

* The same targets as ``networks.lora`` (:func:`engine.lora_plan.unet_targets`, the CLIP attention/MLP
  Linears); with ``conv_dim`` (which must equal ``network_dim``) also the ResNet and sampler convs, every
  module at ``network_dim`` / ``network_alpha`` (kohya's DyLoRA ignores ``conv_alpha``).
* Each rank is its own parameter pair (``lora_A[i]``: 1 × in, kaiming-uniform; ``lora_B[i]``: out × 1,
  zeros), so an optimizer sees, and updates, only the ranks that got a gradient.
* In each training forward a module draws ``b = randint(0, dim - 1)`` from Python's ``random`` (kohya's
  generator: the run state saves it), rounded down to a multiple of ``unit``; only ranks ``b … b+unit-1``
  get gradients, and the output is the full-rank LoRA times ``alpha/dim · sqrt(dim / (b + unit))``.
  A gradient-checkpointing recompute reuses the forward's draw instead of drawing again.
* Outside training (eval mode or no grad: validation, samples) nothing is drawn and the module is the
  plain LoRA of its file (factor 1). kohya draws there too; here validation and samples show what the
  saved file does, and they never move the training's random stream.

Files are kohya's plain LoRA keys (``lora_down.weight`` = the ranks stacked, ``lora_up.weight``,
``alpha``), loadable by ``networks.lora`` and every LoRA loader; the first ``k·unit`` ranks of a file
(``down[:k·unit]``, ``up[:, :k·unit]``, same alpha) are a working smaller LoRA.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import ConfigError
from engine.lora import TEXT_ENCODER_TARGET_REGEX, LoraNetwork, _validate, kohya_text_encoder_name


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing recomputes forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class DyLoraModule(nn.Module):
    """kohya's ``DyLoRAModule`` as a forward hook on its base Linear / Conv2d (registered as its child)."""

    def __init__(self, kohya_name: str, module_name: str, base: nn.Module, part: str, dim: int, alpha: float,
                 unit: int, block: int = -1) -> None:
        super().__init__()
        if dim % unit:
            raise ConfigError(f"--network_args unit={unit} must divide the rank {dim} of {kohya_name}")
        self.kohya_name, self.module_name, self.part, self.block = kohya_name, module_name, part, block
        self.dim, self.unit, self.alpha = dim, unit, float(alpha)
        self.scale = self.alpha / dim
        self.trainable = True
        self.is_conv = isinstance(base, nn.Conv2d)
        self.is_conv3x3 = self.is_conv and tuple(base.kernel_size) == (3, 3)
        if self.is_conv:
            in_dim, out_dim = base.in_channels, base.out_channels
        else:
            in_dim, out_dim = base.in_features, base.out_features
        if self.is_conv3x3:
            self.stride, self.padding = base.stride, base.padding
            a_shape, b_shape = (1, in_dim, *base.kernel_size), (out_dim, 1, 1, 1)
        else:
            a_shape, b_shape = (1, in_dim), (out_dim, 1)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(a_shape)) for _ in range(dim)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b_shape)) for _ in range(dim)])
        for p in self.lora_A:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.rank: int | None = None       # the last draw: the first trained rank

    # ---- the interface engine.lora's modules have
    @property
    def down_params(self) -> list[nn.Parameter]:
        return list(self.lora_A)

    @property
    def up_params(self) -> list[nn.Parameter]:
        return list(self.lora_B)

    @property
    def down(self) -> torch.Tensor:
        """The ranks stacked in kohya's ``lora_down.weight`` shape (a 1x1 conv's with its 1x1 kernel)."""
        down = torch.cat(tuple(self.lora_A), dim=0)
        return down[..., None, None] if self.is_conv and not self.is_conv3x3 else down

    @property
    def up(self) -> torch.Tensor:
        up = torch.cat(tuple(self.lora_B), dim=1)
        return up[..., None, None] if self.is_conv and not self.is_conv3x3 else up

    def assign(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Copy kohya-layout ``down``/``up`` weights into the per-rank parameters."""
        if self.is_conv and not self.is_conv3x3:
            down, up = down.flatten(1), up.flatten(1)
        with torch.no_grad():
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
                a.copy_(down[i:i + 1].to(device=a.device, dtype=a.dtype))
                b.copy_(up[:, i:i + 1].to(device=b.device, dtype=b.dtype).reshape(b.shape))

    # ---- the forward
    def _draw(self) -> int:
        if self.rank is None or not _in_backward():   # a recompute in the backward keeps the forward's draw
            rank = random.randint(0, self.dim - 1)
            self.rank = rank - rank % self.unit
        if self.trainable:
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
                on = self.rank <= i < self.rank + self.unit
                a.requires_grad_(on)
                b.requires_grad_(on)
        return self.rank

    def forward_hook(self, _base: nn.Module, inputs, result):
        x = inputs[0]
        factor = 1.0
        if self.training and torch.is_grad_enabled():
            factor = math.sqrt(self.dim / (self._draw() + self.unit))
        lora_a = torch.cat(tuple(self.lora_A), dim=0)
        lora_b = torch.cat(tuple(self.lora_B), dim=1)
        x = x.to(lora_a.dtype)
        if self.is_conv3x3:
            ab = nn.functional.conv2d(x, lora_a, stride=self.stride, padding=self.padding)
            ab = nn.functional.conv2d(ab, lora_b)
        else:
            ab = x
            if self.is_conv:
                ab = ab.reshape(ab.size(0), ab.size(1), -1).transpose(1, 2)   # (N, C, H, W) -> (N, H*W, C)
            ab = nn.functional.linear(nn.functional.linear(ab, lora_a), lora_b)
            if self.is_conv:
                ab = ab.transpose(1, 2).reshape(ab.size(0), -1, *x.size()[2:])
        return result + (ab * self.scale * factor).to(result.dtype)


@dataclass
class DyLoraNetwork(LoraNetwork):
    """The DyLoRA modules of a UNet and text encoder, with :class:`engine.lora.LoraNetwork`'s file interface."""

    unit: int = 1
    # kohya's DyLoRANetwork has no apply_max_norm_regularization: --scale_weight_norms is ignored, with a warning
    apply_max_norm = None


def _attach(base: nn.Module, module: DyLoraModule) -> DyLoraModule:
    base.add_module("dylora", module)
    base.register_forward_hook(module.forward_hook)
    return module


def apply_dylora(unet: nn.Module, text_encoder: nn.Module | None, *, dim: int, alpha: float, network_args,
                 train_unet: bool = True, train_text_encoder: bool = True,
                 text_encoder_frozen: bool = False) -> DyLoraNetwork:
    """kohya's ``networks.dylora.create_network`` + ``apply_to``: the modules, base weights frozen.

    ``train_text_encoder=False`` (``--network_train_unet_only``): no text-encoder modules;
    ``text_encoder_frozen`` (``--text_encoder_lr 0``) / ``train_unet=False``: modules saved but frozen."""
    from engine.lora_plan import unet_targets
    from engine.network_args import NetworkArgs

    dim, alpha_f = _validate(dim, alpha)
    unit = network_args.unit or 1
    for model in (unet, text_encoder):
        if model is not None:
            model.requires_grad_(False)
    plan_args = NetworkArgs(conv_dim=dim, conv_alpha=alpha_f) if network_args.conv_dim else NetworkArgs()
    targets = unet_targets(unet, dim, alpha_f, plan_args)
    if not targets:
        raise ConfigError("no UNet module matched kohya's DyLoRA targets; the base model is not an SD1.5 UNet")
    named = dict(unet.named_modules())
    modules = [_attach(named[t.module_name], DyLoraModule(t.kohya_name, t.module_name, named[t.module_name],
                                                          "unet", dim, alpha_f, unit, t.block)) for t in targets]
    if train_text_encoder and text_encoder is not None:
        pattern = re.compile(TEXT_ENCODER_TARGET_REGEX)
        te_modules = [_attach(m, DyLoraModule(kohya_text_encoder_name(n), n, m, "text_encoder", dim, alpha_f, unit))
                      for n, m in list(text_encoder.named_modules())
                      if pattern.fullmatch(n) and isinstance(m, nn.Linear)]
        if not te_modules:
            raise ConfigError("no text-encoder module matched kohya's DyLoRA targets; the text encoder is not CLIP")
        modules += te_modules
    net = DyLoraNetwork(dim=dim, alpha=alpha_f, unit=unit, text_encoder_frozen=bool(text_encoder_frozen),
                        modules=modules, loraplus_unet_ratio=network_args.unet_ratio,
                        loraplus_text_encoder_ratio=network_args.text_encoder_ratio)
    for m in modules:
        m.train((unet if m.part == "unet" else text_encoder).training)
        m.trainable = train_unet if m.part == "unet" else not text_encoder_frozen
        target = net.unet_params if m.part == "unet" else net.text_encoder_params
        for p in m.down_params + m.up_params:
            p.requires_grad_(m.trainable)
            target.append(p)
    return net
