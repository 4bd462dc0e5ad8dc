"""How many parameters a ``lycoris.kohya`` network has on an SD1.x model, from the component configs
(no torch, no weights): the memory pre-flight and the disk budget use it instead of networks.lora's
``network_dim × Σ(in + out)``, which is far off for LyCORIS (LoKr's ``network_dim = 100000`` means
"full-rank Kronecker factor", not a rank-100000 matrix).

The modules are those of LyCORIS's presets on an SD1.x UNet and CLIP text encoder: the
Transformer2DModel layers, the ResnetBlock2D and down/up-sampler layers (3x3 convs only when the
preset enables convs and ``conv_dim`` > 0), ``conv_in``/``conv_out``/``time_embedding`` for the full
presets, the CLIP attention and MLP layers. Per module the count follows each algorithm's factors
(LoCon/DyLoRA, LoHa, LoKr with LyCORIS's factorisation and full-matrix switch, IA³, (B)OFT, GLoRA,
full); norms trained with ``train_norm`` are left out (a few thousand parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.lycoris_args import check_lycoris_args


@dataclass(frozen=True)
class Layer:
    group: str        # attn | resnet | sampler | extra (conv_in, conv_out, time_embedding) | te
    out: int
    inp: int
    k: int = 1        # kernel side (1 for Linear and 1x1 Conv)


# preset -> (UNet groups, text encoder, convs enabled)
_PRESETS = {
    "full": ({"attn", "resnet", "sampler", "extra"}, True, True),
    "full-lin": ({"attn", "resnet", "extra"}, True, False),
    "attn-mlp": ({"attn"}, True, False),
    "attn-only": ({"attn"}, True, False),
    "unet-only": ({"attn", "resnet", "sampler"}, False, True),
    "unet-transformer-only": ({"attn"}, False, False),
    "unet-convblock-only": ({"resnet", "sampler"}, False, True),
    "ia3": ({"attn"}, True, False),
}


def _attention(c: int, cross: int, depth: int) -> list[Layer]:
    per = [Layer("attn", c, c)] * 5 + [Layer("attn", c, cross)] * 2 + [Layer("attn", c, c)] + \
          [Layer("attn", 8 * c, c), Layer("attn", c, 4 * c)]
    return [Layer("attn", c, c)] * 2 + per * depth        # proj_in, proj_out + the transformer blocks


def _resnet(inp: int, out: int, temb: int) -> list[Layer]:
    layers = [Layer("resnet", out, inp, 3), Layer("resnet", out, temb), Layer("resnet", out, out, 3)]
    return layers + ([Layer("resnet", out, inp)] if inp != out else [])


def unet_layers(cfg: dict) -> list[Layer]:
    ch = list(cfg.get("block_out_channels", [320, 640, 1280, 1280]))
    per = int(cfg.get("layers_per_block", 2))
    cross = cfg.get("cross_attention_dim", 768)
    cross = int(cross[0] if isinstance(cross, list) else cross)
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = int(depth[0] if isinstance(depth, list) else depth)
    temb = 4 * ch[0]
    down, up = list(cfg.get("down_block_types", [])), list(cfg.get("up_block_types", []))
    layers = [Layer("extra", ch[0], int(cfg.get("in_channels", 4)), 3),
              Layer("extra", int(cfg.get("out_channels", 4)), ch[0], 3),
              Layer("extra", temb, ch[0]), Layer("extra", temb, temb)]
    skips, prev = [ch[0]], ch[0]
    for i, kind in enumerate(down):
        for _ in range(per):
            layers += _resnet(prev, ch[i], temb)
            prev = ch[i]
            layers += _attention(ch[i], cross, depth) if "CrossAttn" in kind else []
            skips.append(prev)
        if i < len(down) - 1:
            layers.append(Layer("sampler", prev, prev, 3))
            skips.append(prev)
    layers += _resnet(prev, prev, temb) * 2 + _attention(prev, cross, depth)
    rev = ch[::-1]
    for i, kind in enumerate(up):
        for _ in range(per + 1):
            layers += _resnet(prev + skips.pop(), rev[i], temb)
            prev = rev[i]
            layers += _attention(rev[i], cross, depth) if "CrossAttn" in kind else []
        if i < len(up) - 1:
            layers.append(Layer("sampler", prev, prev, 3))
    return layers


def text_encoder_layers(cfg: dict) -> list[Layer]:
    h, i, n = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    return ([Layer("te", h, h)] * 4 + [Layer("te", i, h), Layer("te", h, i)]) * n


def _factor(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's factorisation ``dim = m × n`` (m ≤ n): ``factor`` itself when it divides ``dim``, else
    the next divisors upwards while m + n shrinks and m stays ≤ factor (any m for factor -1)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        cand = next(d for d in range(m + 1, dim + 1) if dim % d == 0)
        if cand + dim // cand > m + n or cand > limit:
            break
        m, n = cand, dim // cand
    return min(m, n), max(m, n)


def _params(layer: Layer, algo: str, rank: int, kw: dict) -> int:
    o, i, kk = layer.out, layer.inp, layer.k * layer.k
    if algo == "full":
        return o * i * kk + o
    if algo == "ia3":
        return o          # LyCORIS 4.1.3's create_network does not pass train_on_input on
    if algo in ("diag-oft", "boft"):
        size = _factor(o, rank)[0]
        return o * size * (2 if algo == "boft" else 1)
    dora = o if kw.get("dora_wd", "false").lower() == "true" else 0
    if algo == "lokr":
        f = int(kw.get("factor", -1))
        (in_m, in_n), (out_l, out_k) = _factor(i, f), _factor(o, f)
        both = str(kw.get("decompose_both", False)).lower() not in ("", "false")   # LyCORIS: the raw text
        w1 = rank * (out_l + in_m) if both and rank < max(out_l, in_m) / 2 else out_l * in_m
        w2 = out_k * in_n * kk if rank >= max(out_k, in_n) / 2 else rank * (out_k + in_n * kk)
        return w1 + w2 + dora
    low = rank * (i * kk + o)
    if kk > 1 and kw.get("use_tucker", kw.get("use_cp", "false")).lower() == "true":
        low = rank * (i + o) + rank * rank * kk
    return low * (2 if algo in ("loha", "glora") else 1) + dora


def lycoris_param_count(network_args, network_dim: int, network_alpha: float, unet_cfg: dict | None,
                        te_cfg: dict | None, *, train_unet: bool = True, train_text_encoder: bool = True) -> tuple[int, int]:
    """(modules, parameters) of the ``lycoris.kohya`` network ``network_args`` asks for (0, 0 for a part
    not trained or without a config)."""
    kw = check_lycoris_args(network_args)
    algo = kw.get("algo", "lora").lower()
    groups, with_te, convs = _PRESETS.get(kw.get("preset", "full"), _PRESETS["full"])
    conv_dim = int(kw.get("conv_dim", network_dim) or network_dim) if convs else 0
    layers = [la for la in unet_layers(unet_cfg) if la.group in groups] if unet_cfg and train_unet else []
    layers += text_encoder_layers(te_cfg) if te_cfg and train_text_encoder and with_te else []
    modules = params = 0
    for layer in layers:
        if layer.k > 1 and conv_dim <= 0:
            continue
        modules += 1
        params += _params(layer, algo, conv_dim if layer.k > 1 else int(network_dim), kw)
    return modules, params
