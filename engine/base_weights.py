"""kohya's ``--base_weights`` / ``--base_weights_multiplier``: LoRA (or LyCORIS) files merged into the base
U-Net and text encoder before the network that trains is made.

As kohya's train_network.py: for each file, in order, with its multiplier (1.0 for a file the multiplier
list does not reach), the file's network is rebuilt for inference from its weights and merged into the
base weights (``W += multiplier · ΔW``; for kohya's LoRA ΔW = up·down·alpha/dim, linear and conv layers
alike); the trained network is made afterwards, over the merged model, and its file holds only itself.

The merge is LyCORIS's: each module of the file is rebuilt by its ``lycoris.modules`` class, told by the
keys (kohya's ``lora_down``/``lora_up``/``alpha``, conv, ``lora_mid``; LoHa, LoKr, DoRA …), over the layer
its kohya name names, and merged by that module's ``merge_to(multiplier)``. That is what
``lycoris.kohya.create_network_from_weights`` + ``merge_to`` do for kohya, less two faults of LyCORIS 4.1:
its network's ``merge_to`` merges every module with multiplier 1 (not the one the network was built with)
(and LoHa/LoKr modules scale their ΔW twice, see :func:`_merge`), and ``create_network_from_weights`` first
builds a throwaway full network from whatever preset an earlier network left in the class (over an SD1.x UNet
the default one stops on "duplicated lora name"). The text
encoder is named under ``text_model`` (``engine.lycoris_net``), so its keys are kohya's
``lora_te_text_model_…``. The base models are float32 when this runs (the merge computes in the weight's
dtype); the merged weights are cast with the rest of the model.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Sequence

from engine.errors import CheckpointError, ConfigError

FLAG = "--base_weights"
_PREFIXES = ("lora_unet_", "lora_te_")


def multiplier_of(multipliers: Sequence[float], index: int) -> float:
    """kohya: the index's multiplier when the list reaches it, else 1.0."""
    return float(multipliers[index]) if index < len(multipliers) else 1.0


def path_problem(paths: Sequence[str]) -> str | None:
    """Why ``--base_weights`` cannot be read, checked before the base model loads (None when every file is)."""
    for path in paths:
        if not Path(path).expanduser().is_file():
            what = "a folder, not a file" if Path(path).expanduser().is_dir() else "no such file"
            return f"{path}: {what}; give LoRA files (.safetensors, .pt or .ckpt) to merge into the base model"
    return None


def multiplier_warnings(paths: Sequence[str], multipliers: Sequence[float]) -> list[str]:
    """kohya reads one multiplier per file: more multipliers than files are ignored, and said so here."""
    if len(multipliers) <= len(paths):
        return []
    extra = multipliers[len(paths):]
    return [f"--base_weights_multiplier: {len(multipliers)} values for {len(paths)} --base_weights file(s); "
            f"the extra {' '.join(f'{m:g}' for m in extra)} merge nothing (kohya ignores them too)"]


def _read(path: str) -> dict[str, Any]:
    import torch

    from engine.checkpoint import read_lora_file

    try:
        tensors, _ = read_lora_file(Path(path).expanduser())
    except CheckpointError as err:
        raise ConfigError(f"{FLAG}: {err}") from None
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{FLAG}: {path}: {key} is no tensor; not a LoRA state dict")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{FLAG}: {path}: {key} has NaN or Inf values; merge another file")
    return tensors


def _not_kohya(path: str, why: str) -> ConfigError:
    return ConfigError(f"{FLAG}: {path} {why}: it is not an SD1.x LoRA in kohya's layout (lora_unet_… / "
                       "lora_te_text_model_… keys, as kohya's and LyCORIS's files have)")


def merge_file(path: str, multiplier: float, unet, text_encoder) -> tuple[int, int, int]:
    """Merge one file into ``unet`` and ``text_encoder`` in place: (U-Net modules, text-encoder modules, the
    file's modules that match no layer of this model)."""
    import torch

    from engine.lycoris_net import _kohya_text_encoder, _quiet

    tensors = _read(path)
    in_file = {k.split(".", 1)[0] for k in tensors if "." in k and k.startswith(_PREFIXES)}
    if not in_file:
        raise _not_kohya(path, "has no lora_unet_/lora_te_ modules")
    layers = {f"lora_unet_{name}".replace(".", "_"): layer for name, layer in unet.named_modules()}
    if text_encoder is not None:
        holder = _kohya_text_encoder(text_encoder)
        layers.update({f"lora_te_{name}".replace(".", "_"): layer for name, layer in holder.named_modules()})
    matched = [name for name in sorted(in_file) if name in layers]
    if not matched:
        raise _not_kohya(path, "matches no layer of this model")
    for name in matched:  # kohya's LoRA: a module saved without alpha has alpha = its rank
        down = tensors.get(f"{name}.lora_down.weight")
        if down is not None and f"{name}.alpha" not in tensors:
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    counts = [0, 0]
    with _quiet(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        for name in matched:
            _merge(_rebuild(path, name, tensors, layers[name]).eval(), multiplier)
            counts[name.startswith("lora_te_")] += 1
    return counts[0], counts[1], len(in_file) - len(matched)


def _merge(module, multiplier: float) -> None:
    """``W += multiplier · ΔW`` as the module's forward applies it. LyCORIS 4.1's LoHa and LoKr ``merge_to``
    scale ΔW by alpha/dim twice (their ``get_weight`` already has it): for them the forward's weight is
    written here; every other module merges by its own ``merge_to``."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    if not isinstance(module, (LohaModule, LokrModule)):
        module.merge_to(multiplier)
        return
    weight = module.org_module[0].weight
    diff = module.get_weight(module.shape).to(weight.dtype) * module.scalar.to(weight.dtype)
    merged = module.apply_weight_decompose(weight + diff, multiplier) if module.wd else weight + diff * multiplier
    weight.data.copy_(merged.reshape(weight.shape).to(weight.dtype))


def _rebuild(path: str, name: str, tensors: dict[str, Any], layer) -> Any:
    """LyCORIS's module for ``name`` from the file's tensors (its algo told by the keys), as
    ``lycoris.kohya.create_network_from_weights`` rebuilds each module."""
    from lycoris.modules import get_module, make_module

    try:
        algo, params = get_module(tensors, name)
        module = make_module(algo, params, name, layer) if algo is not None else None
    except Exception as err:  # noqa: BLE001 - LyCORIS's rebuild fails in many ways on a foreign file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{FLAG}: {path}: LyCORIS cannot rebuild {name} ({first}); use a kohya-layout "
                          "LoRA/LyCORIS file made for SD1.x") from None
    if module is None:
        raise ConfigError(f"{FLAG}: {path}: {name} has keys of no algo LyCORIS knows "
                          f"({', '.join(sorted(k.split('.', 1)[1] for k in tensors if k.startswith(name + '.'))[:4])})")
    return module


def merge_base_weights(paths: Sequence[str], multipliers: Sequence[float], unet, text_encoder) -> list[str]:
    """kohya's ``--base_weights`` merge; the log lines (kohya's ``merging module: …`` / ``all weights merged:
    …``, and the modules each file merged)."""
    lines: list[str] = []
    for index, path in enumerate(paths):
        multiplier = multiplier_of(multipliers, index)
        lines.append(f"merging module: {path} with multiplier {multiplier}")
        n_unet, n_te, left_out = merge_file(path, multiplier, unet, text_encoder)
        line = f"{path}: {n_unet + n_te} modules merged (U-Net {n_unet}, text encoder {n_te})"
        if left_out:
            line += f"; {left_out} of the file's modules match no layer of this model and were left out"
        lines.append(line)
    if paths:
        lines.append(f"all weights merged: {', '.join(paths)}")
    return lines
