"""``--network_args`` for kohya's ``networks.lora`` and ``networks.dylora``, read as sd-scripts'
``create_network`` of each reads them.

kohya splits each item at its first ``=`` into a string key and a string value; lists (``block_dims`` …)
are comma-separated. Each ``create_network`` reads the keys it knows and ignores the rest: so do these,
and :func:`ignored_args_warnings` names each ignored key in one warning line; a value kohya cannot read
(``int("8.5")``, a failed assertion) is one ConfigError line. The SD1.x UNet has 25 blocks for block-wise dims and LR weights: 0 (IN00, the
``conv_in``, never a LoRA), 1-11 the down blocks, 12 the mid block, 13-24 the up blocks
(:func:`engine.lora_plan.block_index`). This module is light: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import ConfigError

NUM_BLOCKS = 12           # kohya's LoRANetwork.NUM_OF_BLOCKS: down (or up) blocks of SD1.x
NUM_TOTAL_BLOCKS = 2 * NUM_BLOCKS + 1
FLAG = "--network_args"
KNOWN = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
         "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout",
         "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# Keys only LyCORIS (lycoris.kohya) or kohya's networks.dylora read.
LYCORIS = ("algo", "preset", "dora_wd", "factor", "use_tucker", "use_cp", "use_scalar", "decompose_both",
           "rank_dropout_scale", "train_norm", "bypass_mode", "train_on_input", "block_size", "constraint",
           "rescaled", "weight_decompose", "full_matrix", "wd_on_output")
DYLORA = ("unit",)
# What kohya's networks.dylora reads (it ignores every other key).
DYLORA_KNOWN = ("unit", "conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                "loraplus_text_encoder_lr_ratio")
DYLORA_MODULE = "networks.dylora"
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_OTHER_MODEL = "it trains {} models; this trainer trains SD1.x: use networks.lora (or lycoris.kohya)"
# kohya's other network modules (sd-scripts' networks/), each with why it is not trained here.
UNSUPPORTED_MODULES = {
    "networks.lora_fa": "kohya's LoRA-FA (lora_down frozen at its random start) is not implemented here; use "
                        "networks.lora, or lycoris.kohya",
    "networks.oft": "kohya's OFT is not implemented here; LyCORIS's orthogonal fine-tuning is: "
                    "--network_module=lycoris.kohya --network_args algo=diag-oft (or algo=boft)",
    "networks.lora_diffusers": "it applies LoRA files to diffusers pipelines for inference, it is not a training "
                               "network (kohya's train_network.py cannot train it either); use networks.lora",
    "networks.control_net_lllite": "ControlNet-LLLite is trained by kohya's sdxl_train_control_net_lllite.py for "
                                   "SDXL, not by train_network.py; use networks.lora",
    "networks.control_net_lllite_for_train": "ControlNet-LLLite is trained by kohya's "
                                             "sdxl_train_control_net_lllite.py for SDXL, not by train_network.py; "
                                             "use networks.lora",
    "networks.lora_flux": _OTHER_MODEL.format("FLUX.1"),
    "networks.oft_flux": _OTHER_MODEL.format("FLUX.1"),
    "networks.lora_sd3": _OTHER_MODEL.format("SD3"),
    "networks.lora_lumina": _OTHER_MODEL.format("Lumina"),
    "networks.lora_hunyuan_image": _OTHER_MODEL.format("HunyuanImage"),
    "networks.lora_anima": _OTHER_MODEL.format("Anima"),
}


def unsupported_module(network_module: str) -> str | None:
    """Why ``--network_module`` cannot train here, for kohya's modules this trainer does not have (else None)."""
    why = UNSUPPORTED_MODULES.get(network_module)
    return f"{network_module} is not supported: {why}" if why else None


@dataclass(frozen=True)
class NetworkArgs:
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None          # 25 values when block-wise (else None)
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    block_lr_weight: tuple[float, ...] | None = None   # 25 LR factors (thresholded), or None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    unit: int | None = None                            # networks.dylora: ranks trained together (else None)

    @property
    def conv_enabled(self) -> bool:
        """The ResNet / down- and up-sampler convs get adapters (kohya's LoCon)."""
        return self.conv_dim is not None or self.conv_block_dims is not None

    @property
    def unet_ratio(self) -> float | None:
        return self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio

    @property
    def text_encoder_ratio(self) -> float | None:
        return self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio


def split_items(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["conv_dim=8", …]`` -> ``{"conv_dim": "8", …}`` (kohya: ``key, value = arg.split("=", 1)``)."""
    out: dict[str, str] = {}
    for item in items or ():
        parts = str(item).split("=", 1)
        if len(parts) != 2 or not parts[0].strip():
            raise ConfigError(f"{FLAG}: {item!r} is not key=value (e.g. conv_dim=8 block_dims=2,4,…)")
        out[parts[0].strip()] = parts[1].strip()
    return out


def _number(key: str, value: str, kind: type, *, lo: float = 0.0, below_one: bool = False):
    try:
        got = kind(value)
    except ValueError:
        got = None
    if got is None or not math.isfinite(got) or got < lo or (below_one and got >= 1):
        want = "a probability in [0, 1)" if below_one else f"{'an integer' if kind is int else 'a number'} ≥ {lo:g}"
        raise ConfigError(f"{FLAG}: {key}={value!r} must be {want}")
    return got


def _list(key: str, value: str, kind: type) -> tuple:
    items = value.split(",")
    if len(items) != NUM_TOTAL_BLOCKS:
        raise ConfigError(f"{FLAG}: {key} must have {NUM_TOTAL_BLOCKS} comma-separated values for SD1.x "
                          f"(IN00-IN11, MID, OUT00-OUT11), got {len(items)}")
    return tuple(_number(key, v.strip(), kind) for v in items)


def _lr_weights(key: str, value: str | None, count: int) -> list[float] | None:
    """kohya's down/up_lr_weight (12 numbers, or a preset name with an optional ``+base``) and
    mid_lr_weight (1 number): short lists are filled with 1, long ones cut."""
    if value is None:
        return None
    if "," in value or key == "mid_lr_weight":
        weights = [_number(key, s.strip(), float) if s.strip() else 0.0 for s in value.split(",")]
    else:
        name, _, base_text = value.partition("+")
        if name not in LR_PRESETS:
            raise ConfigError(f"{FLAG}: {key}={value!r} must be {count} comma-separated weights or one of "
                              f"{', '.join(LR_PRESETS)} (optionally +base, e.g. cosine+0.5)")
        base = _number(key, base_text, float) if base_text else 0.0
        n = count - 1
        if name in ("cosine", "sine"):
            steps = reversed(range(count)) if name == "cosine" else range(count)
            weights = [math.sin(math.pi * (i / n) / 2) + base for i in steps]
        elif name in ("linear", "reverse_linear"):
            steps = range(count) if name == "linear" else reversed(range(count))
            weights = [i / n + base for i in steps]
        else:
            weights = [base] * count
    return (weights + [1.0] * count)[:count]


def parse_network_args(items: list[str] | tuple[str, ...] | None, network_module: str = "networks.lora", *,
                       dim: int | None = None, alpha: float | None = None) -> NetworkArgs:
    """The typed ``--network_args`` of a ``networks.lora`` (or ``networks.dylora``) run, or one ConfigError
    naming the key. ``dim``/``alpha`` (``--network_dim``/``--network_alpha``) are checked against DyLoRA's."""
    kw = split_items(items)
    if network_module == DYLORA_MODULE:
        return _parse_dylora(kw, dim, alpha)
    conv_dim = _number("conv_dim", kw["conv_dim"], int) if "conv_dim" in kw else None
    conv_alpha = None
    if conv_dim is not None:
        conv_alpha = _number("conv_alpha", kw["conv_alpha"], float) if "conv_alpha" in kw else 1.0
    if conv_dim == 0:
        conv_dim = conv_alpha = None   # kohya: a rank of 0 makes no module

    weights = None
    down = _lr_weights("down_lr_weight", kw.get("down_lr_weight"), NUM_BLOCKS)
    mid = _lr_weights("mid_lr_weight", kw.get("mid_lr_weight"), 1)
    up = _lr_weights("up_lr_weight", kw.get("up_lr_weight"), NUM_BLOCKS)
    if down is not None or mid is not None or up is not None:
        threshold = _number("block_lr_zero_threshold", kw.get("block_lr_zero_threshold", "0"), float, lo=-math.inf)

        def cut(ws, n):
            return [w if w > threshold else 0.0 for w in ws] if ws is not None else [1.0] * n

        weights = tuple(cut(down, NUM_BLOCKS) + cut(mid, 1) + cut(up, NUM_BLOCKS))

    block_dims = block_alphas = conv_block_dims = conv_block_alphas = None
    if "block_dims" in kw or weights is not None:
        block_dims = list(_list("block_dims", kw["block_dims"], int)) if "block_dims" in kw else None
        block_alphas = list(_list("block_alphas", kw["block_alphas"], float)) if "block_alphas" in kw else None
        if "conv_block_dims" in kw:
            conv_block_dims = list(_list("conv_block_dims", kw["conv_block_dims"], int))
            conv_block_alphas = (list(_list("conv_block_alphas", kw["conv_block_alphas"], float))
                                 if "conv_block_alphas" in kw else [conv_alpha or 1.0] * NUM_TOTAL_BLOCKS)
        elif conv_dim is not None:
            conv_block_dims = [conv_dim] * NUM_TOTAL_BLOCKS
            conv_block_alphas = [conv_alpha] * NUM_TOTAL_BLOCKS
        if weights is not None:       # kohya: a block whose LR weight is 0 gets no LoRA at all
            for i, w in enumerate(weights):
                if w == 0:
                    if block_dims is not None:
                        block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0

    def prob(key):
        return _number(key, kw[key], float, below_one=True) if key in kw else None

    def ratio(key):
        return _number(key, kw[key], float) if key in kw else None

    return NetworkArgs(
        conv_dim=conv_dim, conv_alpha=conv_alpha,
        block_dims=tuple(block_dims) if block_dims is not None else None,
        block_alphas=tuple(block_alphas) if block_alphas is not None else None,
        conv_block_dims=tuple(conv_block_dims) if conv_block_dims is not None else None,
        conv_block_alphas=tuple(conv_block_alphas) if conv_block_alphas is not None else None,
        block_lr_weight=weights, rank_dropout=prob("rank_dropout"), module_dropout=prob("module_dropout"),
        loraplus_lr_ratio=ratio("loraplus_lr_ratio"), loraplus_unet_lr_ratio=ratio("loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=ratio("loraplus_text_encoder_lr_ratio"))


def _parse_dylora(kw: dict[str, str], dim: int | None, alpha: float | None) -> NetworkArgs:
    """kohya's ``networks.dylora.create_network``: ``unit`` (default 1) must divide the rank; ``conv_dim``
    (which must equal ``network_dim``) adds the ResNet and sampler convs, all at ``network_alpha``
    (``conv_alpha`` is read as a number and not used)."""
    unit = _number("unit", kw["unit"], int, lo=1) if "unit" in kw else 1
    if dim is not None and dim % unit:
        raise ConfigError(f"{FLAG}: unit={unit} must divide network_dim={dim} (DyLoRA trains the rank in blocks "
                          f"of unit), e.g. network_dim={unit * max(1, dim // unit)}")
    conv_dim = conv_alpha = None
    if "conv_dim" in kw:
        conv_dim = _number("conv_dim", kw["conv_dim"], int)
        if dim is not None and conv_dim != dim:
            raise ConfigError(f"{FLAG}: conv_dim={conv_dim} must equal network_dim={dim} for {DYLORA_MODULE}, "
                              "as in kohya; set conv_dim to network_dim")
        conv_alpha = alpha
        if "conv_alpha" in kw:
            _number("conv_alpha", kw["conv_alpha"], float)

    def ratio(key):
        return _number(key, kw[key], float) if key in kw else None

    return NetworkArgs(conv_dim=conv_dim, conv_alpha=conv_alpha, unit=unit,
                       loraplus_lr_ratio=ratio("loraplus_lr_ratio"),
                       loraplus_unet_lr_ratio=ratio("loraplus_unet_lr_ratio"),
                       loraplus_text_encoder_lr_ratio=ratio("loraplus_text_encoder_lr_ratio"))


def ignored_args_warnings(items, network_module: str, *, alpha: float | None = None,
                          network_dropout: float | None = None) -> list[str]:
    """One warning line per ``--network_args`` key (or ``--network_dropout``) that the network's kohya
    ``create_network`` ignores: the run goes on without it, as kohya's does."""
    if network_module == "lycoris.kohya":
        from engine.lycoris_args import ignored_lycoris_args

        return ignored_lycoris_args(items)
    if network_module not in ("networks.lora", DYLORA_MODULE):
        return []
    kw = split_items(items)
    dylora = network_module == DYLORA_MODULE
    known = DYLORA_KNOWN if dylora else KNOWN
    lr_weights = any(k in kw for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    out = []
    for key, value in kw.items():
        why = None
        if key in LYCORIS:
            why = "is a LyCORIS option (--network_module=lycoris.kohya reads it)"
        elif key in DYLORA and not dylora:
            why = f"is a DyLoRA option (--network_module={DYLORA_MODULE} reads it)"
        elif key not in known:
            why = f"is not a key kohya's {network_module} reads (it reads {', '.join(known)})"
        elif key == "conv_alpha" and "conv_dim" not in kw:
            why = "is read only with conv_dim (the rank of the conv modules, e.g. conv_dim=4)"
        elif dylora and key == "conv_alpha" and alpha is not None and not math.isclose(float(value), float(alpha)):
            why = f"is not used by {DYLORA_MODULE}: its conv modules take network_alpha={alpha:g}"
        elif key == "block_lr_zero_threshold" and not lr_weights:
            why = "is read only with a down/mid/up_lr_weight"
        elif key in ("block_alphas", "conv_block_dims", "conv_block_alphas") and "block_dims" not in kw and \
                not lr_weights:
            why = "is read only with block_dims or a down/mid/up_lr_weight"
        if why:
            out.append(f"{FLAG}: {key}= {why}; kohya's {network_module} ignores it, and so does this run")
    if dylora and network_dropout:
        out.append(f"--network_dropout={network_dropout:g} is not read by kohya's {DYLORA_MODULE} (DyLoRA has no "
                   "dropout); kohya trains without it, and so does this run")
    return out
