"""kohya's ``--network_weights`` (start from an existing LoRA file) and ``--dim_from_weights`` (take the
rank and alpha from it), for files in kohya's key layout — kohya's own and ours (the same keys).

As kohya's ``network.load_weights`` (non-strict): modules the file lacks keep their fresh
initialisation and keys this network has no module for are left out; both are counted in the
info line. A shape that does not fit, or an alpha other than the run's, is one clear line.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.errors import ConfigError

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def _read(path: str):
    from engine.checkpoint import read_lora_file
    from engine.errors import CheckpointError

    try:
        tensors, _ = read_lora_file(Path(path).expanduser())
    except CheckpointError as err:
        raise ConfigError(f"--network_weights: {err}") from None
    return tensors


def dim_alpha_of_file(path: str) -> tuple[int, float]:
    """The one rank and alpha of a kohya-layout LoRA file (kohya: a module without alpha has alpha = dim)."""
    tensors = _read(path)
    dims: set[int] = set()
    alphas: set[float] = set()
    for key, value in tensors.items():
        if key.endswith(DOWN):
            name = key[: -len(DOWN)]
            dim = int(value.shape[0])
            dims.add(dim)
            alpha = tensors.get(name + ALPHA)
            alphas.add(float(alpha) if alpha is not None else float(dim))
    if not dims:
        raise ConfigError(f"--dim_from_weights: {path} has no LoRA weights (no *.lora_down.weight keys)")
    if len(dims) > 1 or len(alphas) > 1:
        raise ConfigError(f"--dim_from_weights: {path} has modules of different ranks or alphas "
                          f"(ranks {sorted(dims)}, alphas {sorted(alphas)}); spyke-cockpit trains one rank: "
                          "give --network_dim/--network_alpha without --dim_from_weights")
    return dims.pop(), alphas.pop()


def resolve_dim_from_weights(cfg):
    """The config with kohya's ``--dim_from_weights`` applied (network_dim/alpha read from the file)."""
    if not cfg.dim_from_weights:
        return cfg
    if not cfg.network_weights:
        raise ConfigError("--dim_from_weights needs --network_weights=<a LoRA file> to read the rank from")
    dim, alpha = dim_alpha_of_file(cfg.network_weights)
    return cfg.replace(network_dim=dim, network_alpha=alpha)


def load_network_weights(network, path: str) -> str:
    """Copy the file's weights into ``network`` (an ``engine.lora.LoraNetwork``); the info line to log.
    A ``lycoris.kohya`` network loads its own keys (``engine.lycoris_net.LycorisNet.load_weights_file``)."""
    import torch

    if callable(getattr(network, "load_weights_file", None)):
        return network.load_weights_file(path)

    tensors = _read(path)
    loaded = 0
    missing = 0
    with torch.no_grad():
        for m in network.modules:
            down, up = tensors.get(m.kohya_name + DOWN), tensors.get(m.kohya_name + UP)
            if down is None or up is None:
                missing += 1
                continue
            for param, src, key in ((m.down, down, DOWN), (m.up, up, UP)):
                if tuple(src.shape) != tuple(param.shape):  # param: the module's weight in the file's layout
                    raise ConfigError(
                        f"--network_weights: {path}: {m.kohya_name}{key} has shape {list(src.shape)} but this "
                        f"network expects {list(param.shape)}; set --network_dim={int(down.shape[0])} or add "
                        "--dim_from_weights")
                if not bool(torch.isfinite(src).all()):
                    raise ConfigError(f"--network_weights: {path}: {m.kohya_name}{key} has NaN or Inf values")
            alpha = tensors.get(m.kohya_name + ALPHA)
            file_alpha = float(alpha) if alpha is not None else float(down.shape[0])
            if not math.isclose(file_alpha, float(network.alpha), rel_tol=1e-6, abs_tol=1e-8):
                raise ConfigError(
                    f"--network_weights: {path} has network_alpha {file_alpha:g} but --network_alpha is "
                    f"{network.alpha:g}; set --network_alpha={file_alpha:g} or add --dim_from_weights")
            m.assign(down, up)
            loaded += 1
    known = {m.kohya_name + s for m in network.modules for s in (DOWN, UP, ALPHA)}
    extra = sum(1 for k in tensors if k not in known)
    if loaded == 0:
        raise ConfigError(f"--network_weights: {path} has no weights for this network's modules "
                          "(not an SD1.x LoRA in kohya's layout?)")
    line = f"load network weights from {path}: {loaded} of {len(network.modules)} modules"
    if missing:
        line += f"; {missing} not in the file keep their fresh initialisation"
    if extra:
        line += f"; {extra} key(s) of the file are not in this network and were left out"
    return line
