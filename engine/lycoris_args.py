"""``--network_args`` for ``--network_module=lycoris.kohya``, checked before LyCORIS sees them.

kohya hands LyCORIS's ``create_network`` every ``key=value`` item as a string
(``net_kwargs[key] = value``), plus ``dropout`` = ``--network_dropout`` when the items do not name it;
:func:`lycoris_kwargs` returns exactly that dict. Before that, each key LyCORIS 4.1.3 reads for SD1.x
is checked here, so a typo or a bad value is one ConfigError line naming ``--network_args`` and the
key instead of a silent default or a traceback from inside LyCORIS. This module is light: no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.errors import ConfigError
from engine.network_args import FLAG, KNOWN as LORA_KEYS, split_items

MODULE = "lycoris.kohya"
# lycoris.wrapper.network_module_dict: the algorithms ``algo=`` names (``lora`` is LoCon).
ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3")
# lycoris.config.PRESET: the built-in presets (``preset=`` may also be a preset .toml file).
PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
           "unet-convblock-only", "ia3")
INTS = {"conv_dim": 0, "block_size": 1}                  # key -> smallest value
FLOATS = {"conv_alpha": 0.0, "constraint": 0.0, "constrain": 0.0, "loraplus_lr_ratio": 0.0,
          "loraplus_unet_lr_ratio": 0.0, "loraplus_text_encoder_lr_ratio": 0.0}
PROBABILITIES = ("dropout", "rank_dropout", "module_dropout")
BOOLS = ("use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "train_norm", "rescaled",
         "dora_wd", "wd_on_output", "full_matrix", "bypass_mode", "rs_lora", "unbalanced_factorization",
         "decompose_both", "rank_dropout_scale", "train_on_input")
OTHER = ("algo", "preset", "factor")
KNOWN = OTHER + tuple(INTS) + tuple(FLOATS) + PROBABILITIES + BOOLS
# Keys kohya's GUI writes that LyCORIS 4.1.3's kohya.create_network does not pass on to its modules.
NOT_READ = ("rank_dropout_scale", "train_on_input")


def _bad(key: str, value: str, want: str) -> ConfigError:
    return ConfigError(f"{FLAG}: {key}={value!r} must be {want} (for {MODULE})")


def _check(key: str, value: str) -> None:
    if key == "algo":
        if value.lower() == "tlora":
            raise ConfigError(f"{FLAG}: algo=tlora is not supported: LyCORIS's T-LoRA needs the training loop to set "
                              "a rank mask for each step's timestep (lycoris.modules.tlora.set_timestep_mask), which "
                              "kohya's train_network.py does not do, and neither does this trainer; use algo=locon")
        if value.lower() not in ALGOS:
            raise _bad(key, value, "one of " + ", ".join(ALGOS))
    elif key == "preset":
        if value not in PRESETS and not (value.endswith(".toml") and Path(value).expanduser().is_file()):
            raise _bad(key, value, "one of " + ", ".join(PRESETS) + " or an existing LyCORIS preset .toml file")
    elif key == "factor":
        try:
            got = int(value)
        except ValueError:
            got = 0
        if got == 0 or got < -1:
            raise _bad(key, value, "an integer ≥ 1, or -1 (LoKr's automatic factorisation)")
    elif key in INTS:
        try:
            ok = int(value) >= INTS[key]
        except ValueError:
            ok = False
        if not ok:
            raise _bad(key, value, f"an integer ≥ {INTS[key]}")
    elif key in FLOATS or key in PROBABILITIES:
        try:
            got = float(value)
        except ValueError:
            got = math.nan
        if key in PROBABILITIES:
            if not 0 <= got < 1:
                raise _bad(key, value, "a probability in [0, 1)")
        elif not (math.isfinite(got) and got >= FLOATS[key]):
            raise _bad(key, value, f"a number ≥ {FLOATS[key]:g}")
    elif key in BOOLS:
        if value.lower() not in ("true", "false"):
            # LyCORIS reads any text but "false" as true ("0" and "no" too): ask for the unambiguous spelling
            raise _bad(key, value, "True or False")


def check_lycoris_args(items) -> dict[str, str]:
    """The ``key -> value`` strings of ``items``, or one ConfigError naming the key with a bad value. Keys
    LyCORIS does not read pass (it ignores them): :func:`ignored_lycoris_args` names them."""
    kw = split_items(items)
    for key, value in kw.items():
        if key in KNOWN:
            _check(key, value)
    return kw


def ignored_lycoris_args(items) -> list[str]:
    """One warning line per key LyCORIS 4.1.3's ``create_network`` does not read (it ignores them)."""
    out = []
    for key in split_items(items):
        if key in KNOWN:
            continue
        if key in LORA_KEYS:
            out.append(f"{FLAG}: {key}= is a networks.lora option that LyCORIS does not read; {MODULE} ignores "
                       "it, and so does this run")
        else:
            out.append(f"{FLAG}: unknown key {key!r} for {MODULE} (it reads {', '.join(KNOWN)}); LyCORIS ignores "
                       "it, and so does this run")
    return out


def lycoris_kwargs(items, network_dropout: float | None) -> dict:
    """What kohya's train_network.py passes to ``create_network`` besides dim and alpha: the items as
    strings, and ``dropout`` (``--network_dropout``) unless they name it (kohya's workaround for LyCORIS).
    This dict, as JSON, is kohya's ``ss_network_args``."""
    kw: dict = dict(check_lycoris_args(items))
    if "dropout" not in kw:
        kw["dropout"] = network_dropout
    return kw


def lycoris_notes(items) -> list[str]:
    """Warnings for keys LyCORIS takes but does not act on as written (it still gets them, as in kohya)."""
    kw = split_items(items)
    notes = [f"{FLAG}: {key}= is not read by LyCORIS 4.1.3's create_network (passed on, no effect)"
             for key in NOT_READ if key in kw]
    if kw.get("decompose_both", "").lower() == "false" and kw.get("algo", "").lower() == "lokr":
        notes.append(f"{FLAG}: decompose_both=False reaches LyCORIS as the text 'False', which it reads as true "
                     "(as under kohya); remove the key to keep LoKr's w1 whole")
    return notes
