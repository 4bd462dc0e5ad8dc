"""A base model's sizes without loading it: parameter counts and LoRA targets from the weight files'
headers (safetensors: 8-byte length + JSON; no tensor data is read, no torch), the layout from the
component config files (a diffusers folder's, or the SD config folder for a single file).

Where a component has no safetensors file (a folder of ``.bin`` weights) its model is built on
torch's ``meta`` device from its config, which allocates nothing.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The modules kohya's networks.lora (and engine.lora) put an adapter into, matched on key names of
# either layout (diffusers ``down_blocks.0.attentions.0...``, LDM ``input_blocks.1.1...``): inside a
# transformer block the attention / feed-forward projections, plus the block's proj_in / proj_out.
_UNET_TARGET = re.compile(
    r"(?:^|\.)(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))\.weight$")
_TE_TARGET = re.compile(r"encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
                        r"\.weight$")
_LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
               "text_encoder": "cond_stage_model.transformer."}


@dataclass(frozen=True)
class ComponentSizes:
    params: int
    lora_per_rank: int = 0      # sum of (in + out) over the LoRA targets: LoRA params = rank × this


@dataclass(frozen=True)
class ModelShapes:
    unet: ComponentSizes
    text_encoder: ComponentSizes
    vae: ComponentSizes
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict


def read_header(path: Path) -> dict:
    """The tensor table of a .safetensors file (name -> {dtype, shape, ...}), metadata dropped."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header")
        table = json.loads(f.read(n))
    if not isinstance(table, dict):
        raise ValueError(f"{path}: safetensors header is not a table")
    table.pop("__metadata__", None)
    return table


def _sizes(shapes: dict[str, list[int]], target: re.Pattern | None) -> ComponentSizes:
    params = sum(math.prod(s) for s in shapes.values())
    lora = 0
    if target is not None:
        for name, shape in shapes.items():
            if not target.search(name):
                continue
            if len(shape) == 2 or (len(shape) == 4 and shape[2:] == [1, 1]):
                lora += shape[0] + shape[1]
    return ComponentSizes(params, lora)


def _target(component: str) -> re.Pattern | None:
    return {"unet": _UNET_TARGET, "text_encoder": _TE_TARGET}.get(component)


def _folder_shapes(folder: Path) -> dict[str, list[int]] | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    fp32 = [f for f in files if ".fp16." not in f.name] or files
    out: dict[str, list[int]] = {}
    for f in fp32:
        out.update({k: v["shape"] for k, v in read_header(f).items()})
    return out


def _meta_shapes(folder: Path, component: str) -> dict[str, list[int]]:
    """Build the component on the meta device from its config (no memory) and list its shapes."""
    import torch

    with torch.device("meta"):
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            model = cls.from_config(cls.load_config(folder))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=8)
def _cached(model: str, config_dir: str, stamp: float) -> ModelShapes:
    path = Path(model)
    sizes: dict[str, ComponentSizes] = {}
    if path.is_dir():
        configs = {c: _config(path / c) for c in _LDM_PREFIX}
        for component in _LDM_PREFIX:
            shapes = _folder_shapes(path / component) or _meta_shapes(path / component, component)
            sizes[component] = _sizes(shapes, _target(component))
    else:
        configs = {c: _config(Path(config_dir) / c) for c in _LDM_PREFIX}
        table = read_header(path)
        for component, prefix in _LDM_PREFIX.items():
            shapes = {k[len(prefix):]: v["shape"] for k, v in table.items() if k.startswith(prefix)}
            sizes[component] = _sizes(shapes, _target(component))
    return ModelShapes(sizes["unet"], sizes["text_encoder"], sizes["vae"], configs["unet"], configs["vae"],
                       configs["text_encoder"])


def model_shapes(model: str | Path, config_dir: str | Path) -> ModelShapes:
    """Sizes of the base model at ``model`` (diffusers folder or single .safetensors; ``config_dir``
    gives a single file's layout). Raises OSError/ValueError/KeyError when they cannot be read."""
    path = Path(model).expanduser()
    stamp = path.stat().st_mtime
    return _cached(str(path), str(Path(config_dir).expanduser()), stamp)
