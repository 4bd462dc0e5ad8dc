"""Load the SD1.x base model (UNet, VAE, CLIP text encoder, tokenizer), fp32 and offline.

Two inputs are accepted, like kohya's ``--pretrained_model_name_or_path``:

* a diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/``);
* a single-file SD1.x ``.safetensors`` in the original LDM key layout, configured from
  ``engine/assets/sd15/`` (or ``sd_config_dir``) so nothing is fetched from a hub.

Pickle checkpoints (``.ckpt``/``.pt``/``.bin``/``.pth``) can run code when loaded and
are refused unless ``allow_pickle`` (``--allow_pickle``) is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.kohya.hashes import file_legacy_hash, file_sha256

DEFAULT_SD15_CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "sd15"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
_HINT = "pass --pretrained_model_name_or_path=<a diffusers folder or an SD1.x .safetensors>"


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    source: str  # "diffusers" | "single_file"
    model_name: str  # file or folder name (metadata ss_sd_model_name)
    path: Path
    file_sha256: str | None = None

    def sha256(self) -> str | None:
        """Full sha256 hex of the single file (cached; metadata ss_new_sd_model_hash); None for folders."""
        if self.source != "single_file":
            return None
        if self.file_sha256 is None:
            self.file_sha256 = file_sha256(self.path)
        return self.file_sha256

    def legacy_hash(self) -> str | None:
        """kohya's old 8-hex model hash (metadata ss_sd_model_hash): sha256 of the 64 KiB at
        offset 1 MiB of the single file (A1111's first model hash); None for folders."""
        if self.source != "single_file":
            return None
        return file_legacy_hash(self.path)


def load_base_model(
    path: str | Path, *, sd_config_dir: Path | None = None, allow_pickle: bool = False
) -> BaseModel:
    """Load a diffusers folder or an SD1.x single file; raise ModelLoadError (one line) if it can't."""
    _force_offline()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model not found: {path} — {_HINT}")
    if path.is_dir():
        return _load_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"refusing to load pickle checkpoint {path}: pickle files can run code when loaded — "
            "convert it to .safetensors, or pass --allow_pickle if you trust its source"
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"unsupported base model file type {suffix or '(none)'}: {path} — {_HINT}")
    config_dir = Path(sd_config_dir) if sd_config_dir is not None else DEFAULT_SD15_CONFIG_DIR
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"SD config folder {config_dir} has no model_index.json — point it at a diffusers SD1.x config folder")
    if suffix == ".safetensors":
        _check_sd1_safetensors(path, config_dir)
    return _load_single_file(path, config_dir)


def _force_offline() -> None:
    """Nothing in this engine may reach a model hub: set HF_HUB_OFFLINE for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 200:
        first = first[:200].rstrip() + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load_diffusers_folder(folder: Path) -> BaseModel:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json) — {_HINT}")
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"diffusers folder {folder} lacks {', '.join(m + '/' for m in missing)} — "
            "it needs unet/, vae/, text_encoder/ and tokenizer/"
        )
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
    except Exception as exc:  # noqa: BLE001 - anything here is a broken model folder for the user
        raise ModelLoadError(f"could not load diffusers folder {folder}: {_first_line(exc)}") from exc
    return _finish(unet, vae, text_encoder, tokenizer, "diffusers", folder)


def _check_sd1_safetensors(path: Path, config_dir: Path) -> None:
    """Read only the header and refuse anything that is not an SD1.x LDM checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            in_key = "model.diffusion_model.input_blocks.0.0.weight"
            in_shape = f.get_slice(in_key).get_shape() if in_key in keys else None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelLoadError(
            f"{path} is not a readable .safetensors file ({_first_line(exc)}) — re-download it or {_HINT}"
        ) from exc

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders"):
        raise ModelLoadError(f"{path} is an SDXL checkpoint; spyke trains SD1.x LoRAs — {_HINT}")
    if has("cond_stage_model.model."):
        raise ModelLoadError(f"{path} is an SD2.x checkpoint (OpenCLIP text encoder); spyke trains SD1.x LoRAs — {_HINT}")
    if not has("model.diffusion_model."):
        if any("lora_" in k or ".lora." in k or k.startswith("lora") for k in keys):
            what = "a LoRA/network file, not a base model"
        elif has("down_blocks.") or has("conv_in."):
            what = "a single diffusers component (e.g. unet/*.safetensors) — pass the whole diffusers folder instead"
        else:
            what = "not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)"
        raise ModelLoadError(f"{path} is {what} — {_HINT}")
    if not has("cond_stage_model.transformer."):
        raise ModelLoadError(f"{path} has no CLIP text encoder weights (cond_stage_model.transformer.*) — {_HINT}")
    if not has("first_stage_model."):
        raise ModelLoadError(f"{path} has no VAE weights (first_stage_model.*) — {_HINT}")
    if in_shape is not None:
        expected = json.loads((config_dir / "unet" / "config.json").read_text()).get("in_channels", 4)
        if len(in_shape) == 4 and in_shape[1] != expected:
            raise ModelLoadError(
                f"{path} has a UNet with {in_shape[1]} input channels (an inpainting/instruct model?), "
                f"the config in {config_dir} expects {expected} — {_HINT}"
            )


def _load_single_file(path: Path, config_dir: Path) -> BaseModel:
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=torch.float32,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # noqa: BLE001 - report what broke in one line, never a traceback
        raise ModelLoadError(
            f"could not load {path} as an SD1.x checkpoint with the config in {config_dir}: {_first_line(exc)}"
        ) from exc
    return _finish(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, "single_file", path)


def _finish(unet, vae, text_encoder, tokenizer, source: str, path: Path) -> BaseModel:
    import torch

    for module in (unet, vae, text_encoder):
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.to(dtype=torch.float32)
        module.eval()
        meta = [name for name, p in module.named_parameters() if p.is_meta]
        if meta:
            raise ModelLoadError(f"{path} is missing weights for {type(module).__name__} (e.g. {meta[0]}) — {_HINT}")
    return BaseModel(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        source=source, model_name=path.name, path=path,
    )


def attention_kernel(unet: Any) -> str:
    """Which attention runs in ``unet``: the processor class(es) of its attention layers, e.g. 'AttnProcessor2_0'
    (PyTorch's fused scaled_dot_product_attention, on CPU, MPS and CUDA); which SDPA kernel that
    dispatches to is measured by engine.attention_probe."""
    from engine.attention_probe import unet_processors

    return ", ".join(unet_processors(unet)) or "none"


def load_external_vae(path: str | Path, *, sd_config_dir: Path | None = None) -> Any:
    """kohya's ``--vae``: an AutoencoderKL from a diffusers folder (``config.json`` or a ``vae/`` subfolder) or a
    single ``.safetensors`` file (configured from the SD1.5 VAE config shipped in engine/assets/sd15/vae), fp32,
    offline. One ModelLoadError line naming ``--vae`` when it cannot."""
    _force_offline()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--vae: {path} not found — give a diffusers VAE folder or a .safetensors file")
    import torch
    from diffusers import AutoencoderKL

    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            if sub is None and not (path / "config.json").is_file():
                raise ModelLoadError(f"--vae: {path} is not a diffusers VAE folder (no config.json or vae/config.json)")
            return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32,
                                                 local_files_only=True)
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"--vae: {path}: only .safetensors VAE files are loaded (pickle files can run code)")
        config_dir = Path(sd_config_dir) if sd_config_dir is not None else DEFAULT_SD15_CONFIG_DIR
        return AutoencoderKL.from_single_file(str(path), config=str(config_dir), subfolder="vae",
                                              torch_dtype=torch.float32, local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is one line naming the flag
        raise ModelLoadError(f"--vae: cannot load {path}: {_first_line(exc)}") from None


def full_precision_dtype(full_fp16: bool, full_bf16: bool, device: str) -> Any:
    """kohya's ``--full_fp16``/``--full_bf16``: the dtype the LoRA weights train in (None: fp32), or one
    ConfigError line where ``device`` ('cpu', 'mps', 'cuda') cannot train in it."""
    import torch

    from engine.errors import ConfigError

    if not (full_fp16 or full_bf16):
        return None
    name, dtype = ("full_fp16", torch.float16) if full_fp16 else ("full_bf16", torch.bfloat16)
    if device == "cpu" and dtype is torch.float16:
        raise ConfigError("--full_fp16: the CPU cannot train in fp16; use --mixed_precision=bf16 --full_bf16, or "
                          "remove --full_fp16")
    if device == "mps" and dtype is torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ConfigError("--full_bf16: MPS trains in bf16 only on macOS 14 or newer; remove --full_bf16")
    if device == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("--full_bf16: this GPU has no bf16; use --mixed_precision=fp16 --full_fp16")
    return dtype


FP8_NETWORKS = ("networks.lora", "networks.dylora")   # their adapters add to the base layer's own forward


@dataclass(frozen=True)
class Float8Plan:
    """How ``--fp8_base`` stores the base weights on this device (measured by :func:`fp8_base_plan`)."""

    dtype: Any                 # torch.float8_e4m3fn
    norms_in_float8: bool      # the device's group/layer-norm kernels take float8 parameters under autocast


def fp8_base_plan(fp8_base: bool, fp8_base_unet: bool, device: Any, network_module: str,
                  compute_dtype: Any) -> Float8Plan | None:
    """kohya's ``--fp8_base`` / ``--fp8_base_unet``: how the frozen base weights are stored in float8 on
    ``device`` (None: off), or one ConfigError line where the device, the precision or the network cannot.
    The device is asked, not assumed: a float8 Linear and Conv2d must run there under autocast to
    ``compute_dtype`` (they do on CUDA and the CPU; MPS builds without float8 refuse)."""
    import torch

    from engine.errors import ConfigError

    if not (fp8_base or fp8_base_unet):
        return None
    flag = "--fp8_base" if fp8_base else "--fp8_base_unet"
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ConfigError(f"{flag}: this torch has no float8 dtype (torch 2.1 or newer has); remove {flag}")
    if compute_dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"{flag} needs --mixed_precision=fp16 or bf16, as in kohya: the float8 weights compute "
                          "under autocast")
    if network_module not in FP8_NETWORKS:
        raise ConfigError(f"{flag}: {network_module} computes from the base weights themselves, which float8 "
                          f"cannot hold here; use --network_module={' or '.join(FP8_NETWORKS)}, or remove {flag}")
    device = torch.device(device)
    problem, norms = _float8_probe(device, dtype, compute_dtype)
    if problem is not None:
        elsewhere = " (it trains on CUDA and the CPU)" if device.type not in ("cuda", "cpu") else ""
        raise ConfigError(f"{flag}: float8 weights cannot compute on {device.type} here ({problem}); remove "
                          f"{flag}{elsewhere}")
    return Float8Plan(dtype=dtype, norms_in_float8=norms)


def _float8_probe(device: Any, dtype: Any, compute_dtype: Any) -> tuple[str | None, bool]:
    """(why a float8 Linear/Conv2d cannot run on ``device`` under autocast, or None; whether float8
    GroupNorm/LayerNorm parameters can too). Tiny layers, zeros: no RNG is drawn."""
    import torch
    from torch import nn

    def run(*layers_inputs) -> None:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=compute_dtype):
            for layer, shape in layers_inputs:
                layer.to(device)
                for param in layer.parameters():
                    param.data = param.data.to(dtype)
                layer(torch.zeros(shape, device=device))

    try:
        run((nn.Linear(4, 4), (1, 4)), (nn.Conv2d(2, 2, 1), (1, 2, 2, 2)))
    except Exception as err:  # noqa: BLE001 - whatever the backend raises is the reason, in one line
        return _first_line(err), False
    try:
        run((nn.GroupNorm(1, 2), (1, 2, 2, 2)), (nn.LayerNorm(2), (1, 2)))
    except Exception:  # noqa: BLE001 - the CPU's norm kernels refuse float8 parameters
        return None, False
    return None, True


def store_in_float8(module: Any, dtype: Any, *, keep: set[int], compute_dtype: Any, norms_in_compute_dtype: bool,
                    embeddings_in_compute_dtype: bool) -> int:
    """Store ``module``'s frozen parameters in ``dtype`` (float8) as kohya's ``--fp8_base`` does; autocast
    upcasts them per op. Parameters whose ``id`` is in ``keep`` (the network's) are left alone; embedding
    tables (the text encoder's, which no float8 lookup serves) stay in ``compute_dtype``, as in kohya.
    ``norms_in_compute_dtype``: where the device's group/layer-norm kernels take no float8 parameters (the CPU),
    those hold the float8-rounded values in ``compute_dtype``: the same numbers CUDA's autocast computes from. Returns the
    number of bytes the base weights take now."""
    from torch import nn

    total = 0
    for sub in module.modules():
        is_norm = isinstance(sub, (nn.GroupNorm, nn.LayerNorm))
        is_embedding = isinstance(sub, nn.Embedding)
        for param in sub.parameters(recurse=False):
            if id(param) in keep:
                continue
            if is_embedding and embeddings_in_compute_dtype:
                param.data = param.data.to(compute_dtype)
            elif is_norm and norms_in_compute_dtype:
                param.data = param.data.to(dtype).to(compute_dtype)
            elif param.dtype.is_floating_point:
                param.data = param.data.to(dtype)
            total += param.numel() * param.element_size()
    return total
