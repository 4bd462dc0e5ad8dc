"""Diffusers SD1.x components -> one state dict in the original LDM (CompVis) key layout.

The reverse of diffusers' single-file conversion, so a diffusers folder can be written
as the kind of ``.safetensors`` people download (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``). The tests use
it to make a single-file copy of the tiny model; it also works for a full SD1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers resnet parameter names -> LDM ResBlock names
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_module_map(unet) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers module prefix, LDM module prefix, child renames) for every UNet part."""
    cfg = unet.config
    layers = cfg.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block is not an SD1.x UNet layout")
    n_blocks = len(cfg.block_out_channels)
    parts: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i, block in enumerate(unet.down_blocks):
        for j in range(layers):
            ldm = f"input_blocks.{1 + i * (layers + 1) + j}."
            parts.append((f"down_blocks.{i}.resnets.{j}.", ldm + "0.", _UNET_RESNET))
            if getattr(block, "attentions", None):
                parts.append((f"down_blocks.{i}.attentions.{j}.", ldm + "1.", {}))
        if i < n_blocks - 1:
            parts.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", {}))
    for i, block in enumerate(unet.up_blocks):
        has_attn = bool(getattr(block, "attentions", None))
        for j in range(layers + 1):
            ldm = f"output_blocks.{i * (layers + 1) + j}."
            parts.append((f"up_blocks.{i}.resnets.{j}.", ldm + "0.", _UNET_RESNET))
            if has_attn:
                parts.append((f"up_blocks.{i}.attentions.{j}.", ldm + "1.", {}))
        if i < n_blocks - 1:
            last = f"output_blocks.{i * (layers + 1) + layers}."
            parts.append((f"up_blocks.{i}.upsamplers.0.conv.", f"{last}{2 if has_attn else 1}.conv.", {}))
    return parts


def _vae_module_map(vae) -> list[tuple[str, str, dict[str, str]]]:
    n_blocks = len(vae.config.block_out_channels)
    layers = vae.config.layers_per_block
    parts: list[tuple[str, str, dict[str, str]]] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for side in ("encoder", "decoder"):
        parts += [
            (f"{side}.conv_in.", f"{side}.conv_in.", {}),
            (f"{side}.conv_out.", f"{side}.conv_out.", {}),
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", {}),
            (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
            (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for i in range(n_blocks):
        for j in range(layers):
            parts.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        parts.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        up = n_blocks - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(layers + 1):
            parts.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
        parts.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", {}))
    return parts


def _rename(state: dict[str, Tensor], parts, what: str) -> dict[str, tuple[str, Tensor]]:
    """Map each key through the longest matching module prefix; fail on any unmapped key."""
    parts = sorted(parts, key=lambda p: len(p[0]), reverse=True)
    out: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        for src, dst, children in parts:
            if key.startswith(src):
                rest = key[len(src):]
                for old, new in children.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[dst + rest] = (key, value)
                break
        else:
            raise ValueError(f"{what} weight {key!r} has no LDM equivalent (not an SD1.x layout)")
    return out


def diffusers_to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, Tensor]:
    """One LDM-layout state dict from diffusers UNet2DConditionModel, AutoencoderKL, CLIPTextModel."""
    result: dict[str, Tensor] = {}
    for ldm_key, (_, value) in _rename(unet.state_dict(), _unet_module_map(unet), "UNet").items():
        result[UNET_PREFIX + ldm_key] = value.detach().contiguous()
    for ldm_key, (key, value) in _rename(vae.state_dict(), _vae_module_map(vae), "VAE").items():
        value = value.detach()
        # LDM's VAE mid-block attention uses 1x1 convolutions where diffusers uses linears.
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        result[VAE_PREFIX + ldm_key] = value.contiguous()
    # transformers >= 5 flattens CLIPTextModel (no ``text_model.``); older versions nest it.
    for key, value in text_encoder.state_dict().items():
        result[TEXT_PREFIX + key.removeprefix("text_model.")] = value.detach().contiguous()
    return result


def write_ldm_single_file(diffusers_dir: Path, out: Path) -> Path:
    """Write the SD1.x diffusers folder ``diffusers_dir`` as one LDM-layout ``.safetensors``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    diffusers_dir, out = Path(diffusers_dir), Path(out)
    kw = {"local_files_only": True, "torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder", local_files_only=True, dtype=torch.float32)
    state = diffusers_to_ldm_state_dict(unet, vae, text_encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
