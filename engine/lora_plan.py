"""Which UNet modules get a LoRA, with which rank and alpha: kohya's ``networks.lora`` rules.

* Always: every ``nn.Linear`` / 1x1 ``nn.Conv2d`` inside the ``Transformer2DModel`` blocks.
* With ``conv_dim`` (or ``conv_block_dims``), kohya's LoCon: also every ``nn.Linear`` and ``nn.Conv2d``
  of the ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` modules. The 3x3 convs (``conv1``,
  ``conv2``, the samplers' ``conv``) take ``conv_dim``/``conv_alpha``; the Linear ``time_emb_proj`` and the
  1x1 ``conv_shortcut`` take ``network_dim``/``network_alpha``, as kohya's module does.
* With ``block_dims`` or block LR weights: each module's rank and alpha come from its block
  (:func:`block_index`); rank 0, or an LR weight of 0, means no module.

Names are kohya's: ``lora_unet_`` + the module path with ``_`` for ``.``. diffusers registers a
``Downsample2D``'s conv twice (``Conv2d_0`` and ``conv``); kohya's UNet calls it ``conv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from engine.network_args import NUM_BLOCKS, NetworkArgs

ATTENTION_REGEX = re.compile(
    r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
)
CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


@dataclass(frozen=True)
class Target:
    module_name: str      # as peft sees it (named_modules)
    kohya_name: str
    dim: int
    alpha: float
    block: int            # kohya's block index (0-24), -1 outside the blocks


def block_index(kohya_name: str) -> int:
    """kohya's ``get_block_index`` for SD1.x: down blocks 1-11, mid 12, up 13-24 (-1 elsewhere)."""
    m = _UPDOWN.search(kohya_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
        return 1 + idx if kind == "down" else NUM_BLOCKS + 1 + idx
    return NUM_BLOCKS if "mid_block_" in kohya_name else -1


def kohya_name(module_name: str) -> str:
    name = re.sub(r"(downsamplers\.\d+)\.Conv2d_0$", r"\1.conv", module_name)
    return "lora_unet_" + name.replace(".", "_")


def _alpha(alpha: float | None, dim: int) -> float:
    return float(dim) if alpha is None or alpha == 0 else float(alpha)


def unet_targets(unet: nn.Module, dim: int, alpha: float, args: NetworkArgs) -> list[Target]:
    """The UNet's LoRA targets in module order, with kohya's rank and alpha for each."""
    conv_modules: set[str] = set()
    if args.conv_enabled:
        for name, module in unet.named_modules():
            if type(module).__name__ in CONV_PARENTS:
                conv_modules.update(f"{name}.{child}" for child, _ in module.named_children())
    blockwise = args.block_dims is not None or args.block_lr_weight is not None
    out: list[Target] = []
    for name, module in unet.named_modules():
        linear = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1))
        if ATTENTION_REGEX.fullmatch(name):
            if not linear:
                continue
        elif name not in conv_modules or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kname = kohya_name(name)
        block = block_index(kname)
        if blockwise:
            if args.block_lr_weight is not None and args.block_lr_weight[block] == 0:
                continue
            if linear:
                d = args.block_dims[block] if args.block_dims is not None else dim
                a = args.block_alphas[block] if args.block_alphas is not None else alpha
            elif args.conv_block_dims is not None:
                d, a = args.conv_block_dims[block], args.conv_block_alphas[block]
            else:
                continue
        elif linear:
            d, a = dim, alpha
        else:
            d, a = args.conv_dim, args.conv_alpha
        if not d:
            continue
        out.append(Target(name, kname, int(d), _alpha(a, int(d)), block))
    return out


def relink_aliases(unet: nn.Module) -> None:
    """After injection: point each ``Downsample2D.conv`` at its (wrapped) ``Conv2d_0``, so the forward,
    which calls ``conv``, runs the LoRA."""
    for module in unet.modules():
        if type(module).__name__ == "Downsample2D" and hasattr(module, "Conv2d_0"):
            module.conv = module.Conv2d_0
