"""LoRA for SD1.5 via peft, laid out like kohya sd-scripts' ``networks.lora``.

Which modules get an adapter (kohya's default ``networks.lora`` set, no conv_dim):

* UNet: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside the ``Transformer2DModel``
  blocks of the down/mid/up blocks (``proj_in``, ``proj_out``, ``attn1``/``attn2``
  ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``).
* Text encoder (CLIPTextModel): ``q_proj, k_proj, v_proj, out_proj, fc1, fc2`` of
  every encoder layer.

The adapters are peft LoRA layers (adapter name ``"spyke"``), rank ``network_dim``,
``lora_alpha = network_alpha`` (scale alpha/dim, as kohya), lora_A (kohya's
``lora_down``) kaiming-uniform, lora_B (``lora_up``) zeros. ``--network_args`` (conv_dim: the
ResNet 3x3 convs too; block_dims: a rank per block) choose the UNet targets in
``engine.lora_plan``; peft's ``rank_pattern``/``alpha_pattern`` give each its rank and alpha.

Dropout is kohya's, not peft's: peft's ``lora_dropout`` drops the *input* of lora_A, kohya drops
its *output* (``--network_dropout``), zeroes whole ranks (``rank_dropout``, rescaled by 1/(1-p)) or
skips a module's LoRA (``module_dropout``); all three only in training mode, drawn from torch's
global RNG (as kohya; gradient checkpointing replays it), by a forward hook on each lora_A.

Files use kohya's key names (``lora_unet_...``/``lora_te_text_model_...`` with
``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), so the result loads in
ComfyUI, A1111/Forge and ``diffusers``' ``load_lora_weights``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

ADAPTER_NAME = "spyke"

# transformers 5 flattens CLIPTextModel (``encoder.layers.N...``); older releases
# nest it under ``text_model.``. Accept both.
TEXT_ENCODER_TARGET_REGEX = (
    r"(?:text_model\.)?encoder\.layers\.\d+\."
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
)

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


def kohya_text_encoder_name(module_name: str) -> str:
    """``encoder.layers.0.self_attn.q_proj`` -> ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.

    kohya names the modules of the un-flattened CLIPTextModel (``text_model.``);
    ComfyUI and diffusers only map that spelling, so it is kept under transformers 5.
    """
    if not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return TEXT_ENCODER_PREFIX + module_name.replace(".", "_")


def _is_kohya_target(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


@dataclass
class _LoraModule:
    kohya_name: str
    module_name: str
    layer: nn.Module  # the peft LoraLayer (lora.Linear / lora.Conv2d)
    part: str  # "unet" or "text_encoder"
    alpha: float = 1.0
    block: int = -1  # kohya's UNet block index (engine.lora_plan.block_index)

    @property
    def down(self) -> nn.Parameter:
        return self.layer.lora_A[ADAPTER_NAME].weight

    @property
    def up(self) -> nn.Parameter:
        return self.layer.lora_B[ADAPTER_NAME].weight

    @property
    def down_params(self) -> list[nn.Parameter]:
        return [self.down]

    @property
    def up_params(self) -> list[nn.Parameter]:
        return [self.up]

    def assign(self, down: Tensor, up: Tensor) -> None:
        """Copy kohya-layout ``down``/``up`` weights into the adapter."""
        with torch.no_grad():
            for param, src in ((self.down, down), (self.up, up)):
                param.copy_(src.to(device=param.device, dtype=param.dtype))


@dataclass
class LoraNetwork:
    """The LoRA adapters injected into a UNet and (optionally) a text encoder."""

    dim: int
    alpha: float
    unet_params: list[nn.Parameter] = field(default_factory=list)
    text_encoder_params: list[nn.Parameter] = field(default_factory=list)
    text_encoder_frozen: bool = False
    param_dtype: torch.dtype = torch.float32   # fp32, or --full_fp16/--full_bf16's dtype
    modules: list[_LoraModule] = field(default_factory=list, repr=False)
    block_lr_weight: tuple[float, ...] | None = None  # kohya's per-block LR factors (25), or None
    loraplus_unet_ratio: float | None = None
    loraplus_text_encoder_ratio: float | None = None

    # ------------------------------------------------------------------ info
    def module_count(self) -> int:
        """How many modules carry a LoRA (kohya logs these per UNet/text encoder)."""
        return len(self.modules)

    @property
    def unet_module_names(self) -> list[str]:
        return [m.kohya_name for m in self.modules if m.part == "unet"]

    @property
    def text_encoder_module_names(self) -> list[str]:
        return [m.kohya_name for m in self.modules if m.part == "text_encoder"]

    def trainable_params(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get (frozen text-encoder adapters excluded)."""
        return [p for p in self.unet_params + self.text_encoder_params if p.requires_grad]

    # ------------------------------------------------------------------ max-norm
    def apply_max_norm(self, max_norm: float, device) -> tuple[int, float, float]:
        """kohya's ``apply_max_norm_regularization`` (``--scale_weight_norms``) on these modules, in place:
        (modules scaled, mean and max module norm after scaling); see :mod:`engine.max_norm`."""
        from engine.max_norm import apply_max_norm

        ordered = ([m for m in self.modules if m.part == "text_encoder"] +   # kohya's order: text encoder first
                   [m for m in self.modules if m.part != "text_encoder"])
        return apply_max_norm([(m.down, m.up, m.alpha) for m in ordered], max_norm, device)

    def place(self, device) -> None:
        """Nothing to move: the peft adapters live inside the models and move with them."""

    # ------------------------------------------------------------------ save
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The adapters as kohya writes them: CPU, contiguous, ``dtype`` if given.

        ``alpha`` is a 0-dim tensor holding ``network_alpha`` in the save dtype
        (the LoRA weights' dtype when ``dtype`` is None).
        """
        out: dict[str, Tensor] = {}
        for m in self.modules:
            down = m.down.detach()
            up = m.up.detach()
            target = dtype or down.dtype
            out[f"{m.kohya_name}.lora_down.weight"] = down.to("cpu", target).contiguous().clone()
            out[f"{m.kohya_name}.lora_up.weight"] = up.to("cpu", target).contiguous().clone()
            out[f"{m.kohya_name}.alpha"] = torch.tensor(float(m.alpha), dtype=target)
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        """What a training state keeps: the kohya state dict at the training dtype (it copies back exactly)."""
        return self.state_dict_kohya(None)

    def load_state_tensors(self, sd: dict[str, Tensor], *, source: str) -> None:
        self.load_state_dict_kohya(sd, source=source)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for m in self.modules:
            shapes[f"{m.kohya_name}.lora_down.weight"] = tuple(m.down.shape)
            shapes[f"{m.kohya_name}.lora_up.weight"] = tuple(m.up.shape)
            shapes[f"{m.kohya_name}.alpha"] = ()
        return shapes

    # ------------------------------------------------------------------ load
    def load_state_dict_kohya(self, sd: dict[str, Tensor], *, source: str = "the LoRA file") -> None:
        """Copy a kohya-format state dict back into the adapters (resume). Strict.

        Missing or unexpected keys, shape mismatches, non-finite values, or an
        ``alpha`` different from this network's ``network_alpha`` raise CheckpointError.
        """
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
            raise CheckpointError(
                f"{source} does not match this network: {'; '.join(parts)}; "
                "resume with the same base model, network_dim, network_args and text-encoder settings as the run "
                "that wrote it"
            )
        for key, shape in expected.items():
            got = tuple(sd[key].shape)
            if got != shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {list(got)} but this network expects {list(shape)}; "
                    "resume with the same network_dim as the run that wrote it"
                )
            if not bool(torch.isfinite(sd[key]).all()):
                raise CheckpointError(f"{source}: {key} contains NaN or Inf values; resume from an earlier file")
        for m in self.modules:
            file_alpha = sd[f"{m.kohya_name}.alpha"]
            mine = torch.tensor(float(m.alpha), dtype=file_alpha.dtype)
            if not math.isclose(float(file_alpha), float(mine), rel_tol=1e-6, abs_tol=1e-8):
                fix = (f"resume with network_alpha = {float(file_alpha):g}" if m.alpha == self.alpha else
                       "resume with the --network_args alphas of the run that wrote it")
                which = "network_alpha" if m.alpha == self.alpha else "this network's alpha for it"
                raise CheckpointError(
                    f"{source}: {m.kohya_name}.alpha is {float(file_alpha):g} but {which} is {m.alpha:g}; {fix}"
                )
        for m in self.modules:
            m.assign(sd[f"{m.kohya_name}.lora_down.weight"], sd[f"{m.kohya_name}.lora_up.weight"])


def _validate(dim: object, alpha: object) -> tuple[int, float]:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"network_dim must be ≥ 1 (an integer rank), got {dim!r}; set network_dim = 4 … 128")
    try:
        alpha_f = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"network_alpha must be a number ≥ 0, got {alpha!r}; set e.g. network_alpha = 1") from None
    if not math.isfinite(alpha_f) or alpha_f < 0:
        raise ConfigError(f"network_alpha must be a number ≥ 0, got {alpha!r}; set e.g. network_alpha = 1")
    # kohya: alpha None or 0 means "no scaling" (alpha = dim), and that is what it saves.
    if alpha_f == 0:
        alpha_f = float(dim)
    return dim, alpha_f


def _inject(model: nn.Module, regex: str, dim: int, alpha: float, *,
            rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=dim,
        lora_alpha=alpha,
        lora_dropout=0.0,  # kohya's dropout is applied by _DropoutHook instead
        bias="none",
        target_modules=regex,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        init_lora_weights=True,  # lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros — as kohya
        use_rslora=False,
        use_dora=False,
    )
    add_adapter = getattr(model, "add_adapter", None)
    if callable(add_adapter):
        # diffusers / transformers models: registers the adapter so their enable/disable
        # and set_adapters helpers know about it.
        add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def _collect_text_encoder(model: nn.Module, regex: str, alpha: float) -> list[_LoraModule]:
    from peft.tuners.lora import LoraLayer

    pattern = re.compile(regex)
    found: list[_LoraModule] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        if not pattern.fullmatch(name):  # pragma: no cover - peft matched it, so do we
            continue
        if not _is_kohya_target(module.get_base_layer()):
            raise ConfigError(
                f"LoRA target {name} is a {type(module.get_base_layer()).__name__}, not a Linear or 1x1 Conv2d; "
                "the base model is not SD1.5-shaped"
            )
        found.append(_LoraModule(kohya_text_encoder_name(name), name, module, "text_encoder", alpha))
    return found


def _inject_unet(unet: nn.Module, dim: int, alpha: float, args) -> list[_LoraModule]:
    from peft.tuners.lora import LoraLayer

    from engine.lora_plan import relink_aliases, unet_targets

    targets = unet_targets(unet, dim, alpha, args)
    if not targets:
        raise ConfigError("no UNet module matched kohya's LoRA targets; the base model is not an SD1.5 UNet "
                          "(or block_dims / the block LR weights leave every block at 0)")
    escaped = {t.module_name: re.escape(t.module_name) for t in targets}
    regex = "(?:" + "|".join(escaped.values()) + ")"
    ranks = {escaped[t.module_name]: t.dim for t in targets if t.dim != dim}
    alphas = {escaped[t.module_name]: t.alpha for t in targets if t.alpha != alpha}
    _inject(unet, regex, dim, alpha, rank_pattern=ranks, alpha_pattern=alphas)
    relink_aliases(unet)
    modules = dict(unet.named_modules())
    out: list[_LoraModule] = []
    for t in targets:
        layer = modules.get(t.module_name)
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:  # pragma: no cover
            raise ConfigError(f"LoRA target {t.module_name} was not wrapped; the base model is not SD1.5-shaped")
        out.append(_LoraModule(t.kohya_name, t.module_name, layer, "unet", t.alpha, t.block))
    return out


class _DropoutHook:
    """kohya's LoRAModule dropouts on the output of lora_down (training mode only)."""

    def __init__(self, dropout: float | None, rank_dropout: float | None, module_dropout: float | None) -> None:
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    def __call__(self, module: nn.Module, _inputs, lx):
        if not module.training:
            return lx
        if self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return torch.zeros_like(lx)  # lora_up(0) = 0: the module's LoRA is skipped
        if self.dropout is not None:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        if self.rank_dropout is not None:
            mask = torch.rand((lx.size(0), lx.size(1) if lx.dim() == 4 else lx.size(-1)), device=lx.device)
            mask = mask > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            # kohya rescales by 1/(1-p) "as if the rank changed"; lora_up is linear, so scaling here is the same
            lx = lx * mask * (1.0 / (1.0 - self.rank_dropout))
        return lx


def apply_lora(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    *,
    dim: int,
    alpha: float,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    text_encoder_frozen: bool = False,
    network_args=None,
    dropout: float | None = None,
) -> LoraNetwork:
    """Inject kohya-layout LoRA adapters with peft and freeze every base weight.

    * ``train_text_encoder=False`` (kohya ``--network_train_unet_only``): no adapters
      in the text encoder at all; the file has only ``lora_unet_`` keys.
    * ``text_encoder_frozen=True`` (kohya ``--text_encoder_lr 0``): text-encoder
      adapters exist and are saved, but keep ``requires_grad=False``.
    * ``train_unet=False`` (kohya ``--network_train_text_encoder_only``): the UNet
      adapters exist (kohya still creates and saves them) but are frozen.
    * ``network_args``: an ``engine.network_args.NetworkArgs`` (conv_dim, block dims, dropouts, LoRA+);
      ``dropout``: ``--network_dropout``.
    """
    from engine.network_args import NetworkArgs

    args = network_args or NetworkArgs()
    dim, alpha_f = _validate(dim, alpha)
    for p in unet.parameters():
        p.requires_grad_(False)
    if text_encoder is not None:
        for p in text_encoder.parameters():
            p.requires_grad_(False)

    modules = _inject_unet(unet, dim, alpha_f, args)
    if train_text_encoder and text_encoder is not None:
        _inject(text_encoder, TEXT_ENCODER_TARGET_REGEX, dim, alpha_f)
        te_modules = _collect_text_encoder(text_encoder, TEXT_ENCODER_TARGET_REGEX, alpha_f)
        if not te_modules:
            raise ConfigError(
                "no text-encoder module matched kohya's LoRA targets; the base model's text encoder is not CLIP"
            )
        modules += te_modules
    for m in modules:  # new adapter layers start in training mode: give them their model's mode
        m.layer.train((unet if m.part == "unet" else text_encoder).training)

    net = LoraNetwork(dim=dim, alpha=alpha_f, text_encoder_frozen=bool(text_encoder_frozen), modules=modules,
                      block_lr_weight=args.block_lr_weight, loraplus_unet_ratio=args.unet_ratio,
                      loraplus_text_encoder_ratio=args.text_encoder_ratio)
    if dropout is not None or args.rank_dropout is not None or args.module_dropout is not None:
        hook = _DropoutHook(dropout, args.rank_dropout, args.module_dropout)
        for m in modules:
            m.layer.lora_A[ADAPTER_NAME].register_forward_hook(hook)
    # Base weights stay frozen; only the LoRA matrices may train.
    for p in unet.parameters():
        p.requires_grad_(False)
    if text_encoder is not None:
        for p in text_encoder.parameters():
            p.requires_grad_(False)
    for m in modules:
        trainable = train_unet if m.part == "unet" else not text_encoder_frozen
        target = net.unet_params if m.part == "unet" else net.text_encoder_params
        for p in (m.down, m.up):
            p.requires_grad_(trainable)
            target.append(p)
    return net
