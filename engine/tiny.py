"""A tiny SD1.5-shaped model and a generated dataset, built offline.

Random weights with the real SD1.5 module layout (cross-attention UNet, a VAE with
the real x8 downscale, a CLIP text encoder, a CLIP BPE tokenizer made locally), so
the demo and the tests exercise the same code paths as a real base model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TINY_MARKER = "spyke_tiny_model.json"
TINY_VERSION = 1
DEMO_RESOLUTION = 128

_WORDS = [
    "spyke", "plasma", "character", "portrait", "standing", "smiling", "red", "blue",
    "green", "jacket", "hair", "background", "simple", "full", "body", "looking",
    "at", "viewer", "outdoors", "night", "day", "sky", "city", "holding", "sword",
]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(dest: Path, words: list[str] | None = None) -> int:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``dest``.

    The vocabulary has CLIP's layout: the 256 byte symbols, the same with ``</w>``,
    merges learnt greedily from ``words`` so common words are single tokens, then
    ``<|startoftext|>`` and ``<|endoftext|>``. Returns the vocabulary size.
    """
    dest.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words or _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            if (a, b) not in merges:
                merges.append((a, b))
                if merged not in vocab_list:
                    vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (dest / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    return len(vocab)


def build_tiny_model(dest: Path, seed: int = 0, force: bool = False) -> Path:
    """Write a tiny SD1.5-shaped diffusers folder at ``dest`` (a few MB, ~2 s).

    Reuses an existing folder built by the same version unless ``force``.
    """
    dest = Path(dest)
    marker = dest / TINY_MARKER
    if not force and marker.exists():
        try:
            if json.loads(marker.read_text()).get("version") == TINY_VERSION:
                return dest
        except (OSError, ValueError):
            pass
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dest.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(dest / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=DEMO_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEMO_RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu",
    ))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, clip_sample=False,
        steps_offset=1,
    )
    unet.save_pretrained(dest / "unet")
    vae.save_pretrained(dest / "vae")
    text_encoder.save_pretrained(dest / "text_encoder")
    scheduler.save_pretrained(dest / "scheduler")
    (dest / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    marker.write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
    return dest


@dataclass(frozen=True)
class GeneratedDataset:
    root: Path
    dataset_toml: Path
    image_dir: Path
    num_images: int
    num_repeats: int


def generate_dataset(
    dest: Path,
    num_images: int = 8,
    num_repeats: int = 2,
    resolution: int = DEMO_RESOLUTION,
    seed: int = 0,
    batch_size: int = 1,
    sizes: list[tuple[int, int]] | None = None,
) -> GeneratedDataset:
    """Draw ``num_images`` simple pictures with ``.caption`` files and a kohya dataset TOML.

    ``sizes`` (w, h) per image lets tests make several aspect ratios for bucketing.
    """
    from PIL import Image, ImageDraw

    dest = Path(dest)
    image_dir = dest / "img" / f"{num_repeats}_spyke"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_images):
        w, h = sizes[i % len(sizes)] if sizes else (resolution, resolution)
        bg = tuple(rng.randrange(256) for _ in range(3))
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
            x1, y1 = x0 + rng.randrange(8, w // 2 + 8), y0 + rng.randrange(8, h // 2 + 8)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        img.save(image_dir / f"img_{i:03d}.png")
        tags = ["spyke"] + rng.sample(_WORDS[2:], 3)
        (image_dir / f"img_{i:03d}.caption").write_text(", ".join(tags) + "\n")
    toml_path = dest / "dataset.toml"
    toml_path.write_text(
        "[general]\n"
        'caption_extension = ".caption"\n'
        "shuffle_caption = false\n"
        "\n[[datasets]]\n"
        f"resolution = {resolution}\n"
        f"batch_size = {batch_size}\n"
        "enable_bucket = false\n"
        "\n  [[datasets.subsets]]\n"
        f"  image_dir = {json.dumps(str(image_dir))}\n"
        f"  num_repeats = {num_repeats}\n"
        '  class_tokens = "spyke"\n'
    )
    return GeneratedDataset(dest, toml_path, image_dir, num_images, num_repeats)
