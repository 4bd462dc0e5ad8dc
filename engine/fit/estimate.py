"""The run's peak memory, estimated before any model is loaded (no torch).

peak = runtime + frozen weights + LoRA (weights, grads, optimizer state)
       + max(training activations, VAE encode, sampling)

* frozen weights: UNet + text encoder in the training dtype (fp32, or 2 bytes under fp16/bf16; 1 byte for
  what --fp8_base / --fp8_base_unet store in float8), the
  VAE in fp32 with ``--no_half_vae`` or without mixed precision; counts from the weight files'
  headers (engine.fit.shapes).
* LoRA: ``network_dim`` × Σ(in + out) over the targeted modules (a ``lycoris.kohya`` network: its
  parameter count, engine.fit.lycoris_size); fp32 weights + fp32 grads + the optimizer's state (bytes
  per parameter in :data:`OPTIMIZER_STATE_BYTES`).
* activations: the UNet's saved activations for backward grow with batch × latent pixels × the
  channel width at each level (:func:`unet_activation_units`), times a coefficient fitted by
  measurement, one with and one without gradient checkpointing; the text encoder's, when it is
  trained, with its token count × width × layers.
* attention: the SDPA kernels torch runs on CPU (flash) and CUDA (flash / memory-efficient) keep
  no tokens² matrix, so it is inside the fitted activation term; on MPS the backward goes through
  the math kernel, which keeps heads × tokens² per attention layer (added, not measured here).
* VAE encode: a transient of the first encoder level at full resolution (per batch; one image at a
  time with ``--cache_latents``, and then never again during training).

The coefficients come from bench/bench_memory.py (measured peak RSS of real steps on a 2-core
CPU, tiny and full-size SD1.5 at 128–384 px, batch 1–2, gradient checkpointing on/off; figures and
the fit in bench/README.md, raw rows in bench/memory_measurements.json). Re-fit with
``bench/bench_memory.py --refit`` and paste the result into :data:`COEFFICIENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from engine.fit.shapes import ModelShapes

# Fitted by bench/bench_memory.py --refit (see bench/README.md).
COEFFICIENTS = {
    "runtime_bytes": 483e6,          # python + torch + diffusers + the loop's buffers (≈ the tiny run's peak)
    "pixel_bytes": 265.0,            # per image pixel per batch item, whatever the model (data, loss, buffers)
    "unet_act_gc": 7.42,             # bytes per activation unit and activation byte, gradient checkpointing on
    "unet_act_nogc": 13.48,          # ... off
}
TE_TOKENS = 77
TE_ACT_PER_LAYER = 16               # saved tensors of width ``hidden`` per token and layer (no checkpointing)
TE_ACT_PER_LAYER_GC = 2
VAE_ENCODE_TENSORS = 4              # live tensors of the first encoder level during a no-grad encode
CUDA_CONTEXT_BYTES = 500 * 2**20    # the CUDA context and kernels, outside torch's allocator

# Optimizer state per LoRA parameter, in bytes, by kohya's optimizer name (lower-case).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8, "adam": 8, "nadam": 8, "radam": 8, "adamax": 8, "adamwschedulefree": 8, "radamschedulefree": 8,
    "adamw8bit": 2, "pagedadamw8bit": 2, "adam8bit": 2, "lion8bit": 1, "pagedlion8bit": 1,
    "lion": 4, "sgdnesterov": 4, "sgdnesterov8bit": 1, "sgd": 4, "sgdschedulefree": 4,
    "adafactor": 1, "adagrad": 4, "rmsprop": 4, "adadelta": 8,
    "dadaptadam": 12, "dadaptadamw": 12, "dadaptadagrad": 12, "dadaptadanip": 16, "dadaptlion": 8,
    "dadaptsgd": 8, "dadaptation": 12, "prodigy": 16,
}
DEFAULT_OPTIMIZER_STATE_BYTES = 8


@dataclass(frozen=True)
class Settings:
    """What the estimate depends on, beside the model."""
    width: int
    height: int
    batch: int
    gradient_checkpointing: bool
    mixed_precision: str = "no"
    no_half_vae: bool = False
    network_dim: int = 4
    network_module: str = "networks.lora"
    network_args: tuple[str, ...] = ()
    train_unet: bool = True
    train_text_encoder: bool = True
    optimizer: str = "adamw"
    cache_latents: bool = False
    sample_size: tuple[int, int] | None = None      # (w, h) of the largest sample image, None = no sampling
    cached_images: int = 0                          # latents kept with --cache_latents (images × flips)
    text_chunks: int = 1                            # 77-token chunks per caption (--max_token_length / 75)
    device: str = "cpu"
    fp8_base: bool = False                          # the U-Net (and the text encoder) stored in float8: 1 byte
    fp8_base_unet: bool = False                     # only the U-Net in float8


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    parts: dict[str, int]            # runtime, weights, lora, activations, vae_encode, sampling, attention


def _act_bytes(s: Settings) -> int:
    return 4 if s.mixed_precision == "no" else 2


def unet_activation_units(unet_config: dict, latent_w: int, latent_h: int) -> float:
    """Σ over the UNet's blocks of channels × latent pixels at that level × (1 per resnet, 4 per
    transformer block): the shape of what backward keeps, before the fitted bytes-per-unit."""
    channels = list(unet_config.get("block_out_channels", [320, 640, 1280, 1280]))
    layers = int(unet_config.get("layers_per_block", 2))
    down = list(unet_config.get("down_block_types", []))
    up = list(reversed(unet_config.get("up_block_types", [])))   # up[i] runs at level i
    units = 0.0
    for i, c in enumerate(channels):
        pixels = (latent_w >> i) * (latent_h >> i) or 1
        attn_down = 1 if i < len(down) and "CrossAttn" in down[i] else 0
        attn_up = 1 if i < len(up) and "CrossAttn" in up[i] else 0
        units += c * pixels * (layers * (1 + 4 * attn_down) + (layers + 1) * (1 + 4 * attn_up))
    deepest = len(channels) - 1
    units += channels[-1] * ((latent_w >> deepest) * (latent_h >> deepest) or 1) * (2 + 4)
    return units


def _attention_matrix_bytes(shapes: ModelShapes, s: Settings, latent_w: int, latent_h: int) -> int:
    """MPS only: heads × tokens² per self-attention layer kept for backward (all of them without
    checkpointing, one block's at a time with it)."""
    if s.device != "mps":
        return 0
    cfg = shapes.unet_config
    heads = cfg.get("attention_head_dim", 8)
    heads = heads[0] if isinstance(heads, list) else heads
    layers = int(cfg.get("layers_per_block", 2))
    down = list(cfg.get("down_block_types", []))
    total, biggest = 0, 0
    for i, kind in enumerate(down):
        if "CrossAttn" not in kind:
            continue
        tokens = (latent_w >> i) * (latent_h >> i)
        one = s.batch * heads * tokens * tokens * _act_bytes(s)
        biggest = max(biggest, one)
        total += one * (2 * layers + 1)
    return biggest if s.gradient_checkpointing else total


def estimate(shapes: ModelShapes, s: Settings, coefficients: dict | None = None) -> MemoryEstimate:
    k = dict(COEFFICIENTS, **(coefficients or {}))
    wbytes = 4 if s.mixed_precision == "no" else 2
    vbytes = 4 if (s.no_half_vae or s.mixed_precision == "no") else 2
    unet_bytes = 1 if (s.fp8_base or s.fp8_base_unet) else wbytes
    te_bytes = 1 if (s.fp8_base and not s.fp8_base_unet) else wbytes
    weights = shapes.unet.params * unet_bytes + shapes.text_encoder.params * te_bytes + shapes.vae.params * vbytes
    per_rank = (shapes.unet.lora_per_rank if s.train_unet else 0) + \
               (shapes.text_encoder.lora_per_rank if s.train_text_encoder else 0)
    state = OPTIMIZER_STATE_BYTES.get(s.optimizer.lower(), DEFAULT_OPTIMIZER_STATE_BYTES)
    lora = s.network_dim * per_rank * (4 + 4 + state)
    if s.network_module == "lycoris.kohya":   # LyCORIS's own factors (engine.fit.lycoris_size)
        from engine.fit.lycoris_size import lycoris_param_count

        _, count = lycoris_param_count(list(s.network_args), s.network_dim, 1.0, shapes.unet_config,
                                       shapes.text_encoder_config, train_unet=s.train_unet,
                                       train_text_encoder=s.train_text_encoder)
        lora = count * (4 + 4 + state)
    lw, lh = max(1, s.width // 8), max(1, s.height // 8)
    coef = k["unet_act_gc"] if s.gradient_checkpointing else k["unet_act_nogc"]
    acts = s.batch * unet_activation_units(shapes.unet_config, lw, lh) * _act_bytes(s) * coef
    acts += s.batch * s.width * s.height * k["pixel_bytes"]
    if s.train_text_encoder:
        te = shapes.text_encoder_config
        per_layer = TE_ACT_PER_LAYER_GC if s.gradient_checkpointing else TE_ACT_PER_LAYER
        acts += (s.batch * s.text_chunks * TE_TOKENS * te.get("hidden_size", 768) * te.get("num_hidden_layers", 12)
                 * per_layer * _act_bytes(s))
    attention = _attention_matrix_bytes(shapes, s, lw, lh)
    c0 = list(shapes.vae_config.get("block_out_channels", [128]))[0]
    vae_encode = (1 if s.cache_latents else s.batch) * s.width * s.height * c0 * vbytes * VAE_ENCODE_TENSORS
    latent_cache = s.cached_images * 4 * lw * lh * wbytes if s.cache_latents else 0
    sampling = 0
    if s.sample_size:
        sw, sh = s.sample_size
        sampling = sw * sh * c0 * vbytes * (VAE_ENCODE_TENSORS + 2)
    runtime = CUDA_CONTEXT_BYTES if s.device == "cuda" else int(k["runtime_bytes"])
    parts = {"runtime": runtime, "weights": int(weights), "lora": int(lora), "latent_cache": int(latent_cache),
             "activations": int(acts),
             "attention": int(attention), "vae_encode": int(vae_encode), "sampling": int(sampling)}
    peak = runtime + weights + lora + latent_cache + max(acts + attention, vae_encode, sampling)
    return MemoryEstimate(int(peak), parts)


def fit_activation_coefficients(rows: Iterable[dict]) -> dict:
    """Least squares (relative error) of runtime + the two activation coefficients on measured rows
    (bench/memory_measurements.json); each row carries ``spec`` (model path, res, batch, gc)."""
    import numpy as np

    from engine.fit.shapes import model_shapes
    from engine.models import DEFAULT_SD15_CONFIG_DIR

    design, target, weight = [], [], []
    for row in rows:
        if row.get("status") != "completed":
            continue
        spec = row["spec"]
        shapes = model_shapes(spec["model"], DEFAULT_SD15_CONFIG_DIR)
        s = Settings(spec["res"], spec["res"], spec["batch"], spec["gc"], network_dim=32, no_half_vae=True)
        zero = estimate(shapes, s, {"runtime_bytes": 0, "pixel_bytes": 0, "unet_act_gc": 0, "unet_act_nogc": 0})
        fixed = zero.parts["weights"] + zero.parts["lora"] + zero.parts["activations"]   # TE activations
        units = s.batch * unet_activation_units(shapes.unet_config, s.width // 8, s.height // 8) * 4
        design.append([1.0, s.batch * s.width * s.height, units if s.gradient_checkpointing else 0.0,
                       0.0 if s.gradient_checkpointing else units])
        target.append(row["peak_rss"] - fixed)
        weight.append(1.0 / row["peak_rss"])
    a, b, w = np.array(design), np.array(target), np.array(weight)
    sol, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
    return {"runtime_bytes": float(sol[0]), "pixel_bytes": float(sol[1]), "unet_act_gc": float(sol[2]),
            "unet_act_nogc": float(sol[3])}
