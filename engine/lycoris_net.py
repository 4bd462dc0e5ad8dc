"""``--network_module=lycoris.kohya``: the LyCORIS library's own network, built as kohya builds it.

kohya's train_network.py calls ``lycoris.kohya.create_network(1.0, network_dim, network_alpha, vae,
text_encoder, unet, neuron_dropout=…, **network_args)`` and then ``network.apply_to(text_encoder, unet,
train_text_encoder, train_unet)``; :func:`apply_lycoris` does the same over the engine's diffusers UNet
and CLIP text encoder, and :class:`LycorisNet` gives the result the interface the rest of the engine
uses for a network (``engine.lora.LoraNetwork``'s: module names, parameters, kohya-keyed state dict,
strict resume, parameter groups, max-norm).

Two things differ from kohya's own models and are bridged here:

* transformers 5 flattens ``CLIPTextModel`` (``encoder.layers.N…``), kohya's has ``text_model.``; the
  text encoder is handed to LyCORIS under a ``text_model`` attribute so the keys are kohya's
  ``lora_te_text_model_encoder_layers_…``.
* LyCORIS 4.1.3's built-in ``full``/``full-lin`` presets list both the ``TimestepEmbedding`` class and
  the names ``time_embedding.linear_1/2``; on an SD1.x UNet (kohya's or diffusers') that makes the same
  module twice and LyCORIS stops on "duplicated lora name". The class is dropped from the preset while
  the names are kept, so each module is made once, under the same name.

LyCORIS's modules are not children of the models: they replace the wrapped layers' ``forward`` and
live in the network. A forward pre-hook on the UNet and the text encoder gives them their model's
train/eval mode, so dropouts stop when sampling and validation put the model in eval mode.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import CheckpointError, ConfigError
from engine.lycoris_args import FLAG, MODULE, lycoris_kwargs, lycoris_notes

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
_GROUP_NAMES = {"textencoder": "text_encoder", "textencoder plus": "text_encoder plus"}


class _TextModelHolder(nn.Module):
    """``text_model`` -> the CLIP text encoder, so LyCORIS names its modules as on kohya's CLIPTextModel."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = text_encoder


def _kohya_text_encoder(text_encoder: nn.Module | None) -> nn.Module | None:
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        return text_encoder
    return _TextModelHolder(text_encoder)


def _dedupe(preset: dict | None) -> dict | None:
    if not preset:
        return preset
    names = preset.get("unet_target_name") or []
    modules = preset.get("unet_target_module")
    if modules and "TimestepEmbedding" in modules and any(str(n).startswith("time_embedding") for n in names):
        preset = dict(preset, unet_target_module=[m for m in modules if m != "TimestepEmbedding"])
    return preset


@contextlib.contextmanager
def _quiet():
    """LyCORIS logs its info lines to stdout (under the cockpit too): keep it to errors meanwhile."""
    log = logging.getLogger("LyCORIS")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _sd1_presets():
    """LyCORIS's presets without the doubled time-embedding targets; its logger kept to warnings."""
    import lycoris.kohya as kohya

    presets, read = kohya.PRESET, kohya.read_preset
    kohya.PRESET = {name: _dedupe(p) for name, p in presets.items()}
    kohya.read_preset = lambda path: _dedupe(read(path))
    try:
        with _quiet():
            yield kohya
    finally:
        kohya.PRESET, kohya.read_preset = presets, read


@dataclass
class LycorisNet:
    """A ``lycoris.kohya`` network applied to the UNet and (optionally) the text encoder."""

    dim: int
    alpha: float
    net: Any                               # lycoris.kohya.LycorisNetworkKohya
    kwargs: dict                           # what create_network got besides dim/alpha (kohya's net_kwargs)
    text_encoder_frozen: bool = False
    param_dtype: torch.dtype = torch.float32
    unet_params: list[nn.Parameter] = field(default_factory=list)
    text_encoder_params: list[nn.Parameter] = field(default_factory=list)
    hooks: list = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)      # lines for the run's log (keys LyCORIS does not act on)

    # ------------------------------------------------------------------ info
    @property
    def unet_module_names(self) -> list[str]:
        return [m.lora_name for m in self.net.unet_loras]

    @property
    def text_encoder_module_names(self) -> list[str]:
        return [m.lora_name for m in self.net.text_encoder_loras]

    def module_count(self) -> int:
        return len(self.net.unet_loras) + len(self.net.text_encoder_loras)

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.unet_params + self.text_encoder_params if p.requires_grad]

    def place(self, device) -> None:
        """Move the network (its modules live outside the models) to ``device``, keeping its dtypes."""
        self.net.to(device)

    # ------------------------------------------------------------------ save
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What LyCORIS's ``save_weights`` writes: its state dict, every tensor in ``dtype`` when given, except
        a fixed buffer that ``dtype`` cannot hold: a full-rank LoKr's ``alpha`` is its ``network_dim`` (the GUI
        presets' 100000), which fp16 turns into Inf; it is kept in float32, so the file stays finite and loads
        (LyCORIS, ComfyUI and A1111 read ``alpha`` as a number)."""
        buffers = {k for k, _ in self.net.named_buffers()}
        out = {}
        for k, v in self.net.state_dict().items():
            target = dtype or v.dtype
            if k in buffers and v.is_floating_point() and target.is_floating_point and \
                    bool((v.detach().abs() > torch.finfo(target).max).any()):
                target = torch.float32
            out[k] = v.detach().to("cpu", target).contiguous().clone()
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.net.state_dict().items()}

    def _raw(self) -> dict[str, torch.Tensor]:
        return {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a training state keeps: the network's own parameters and buffers under their torch names, as
        they are. LyCORIS's state dict is derived from them (``full``'s ``diff`` = weight - original, DyLoRA's
        stacked blocks, DoRA's scale …) and does not always give the same floats back on reload."""
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self._raw().items()}

    # ------------------------------------------------------------------ load
    def load_state_tensors(self, sd: dict[str, torch.Tensor], *, source: str) -> None:
        """Resume from :meth:`state_tensors` (bit-exact: each tensor copied in place); a state folder that holds
        LyCORIS's keys (written by an earlier version) goes through :meth:`load_state_dict_kohya`."""
        raw = self._raw()
        if set(sd) != set(raw) and set(sd) == set(self.net.state_dict()):
            return self.load_state_dict_kohya(sd, source=source)
        self._check(raw, sd, source, {k for k, _ in self.net.named_buffers()})
        with torch.no_grad():
            for key, tensor in raw.items():
                tensor.copy_(sd[key].to(tensor.device))

    def load_state_dict_kohya(self, sd: dict[str, torch.Tensor], *, source: str = "the LyCORIS file") -> None:
        """Copy a saved state back in (resume). Strict: same keys, shapes and fixed buffers (alpha …)."""
        mine = self.net.state_dict()
        self._check(mine, sd, source, {k for k, _ in self.net.named_buffers()})
        with torch.no_grad():
            self.net.load_state_dict(self._as_parameters(sd), strict=True)

    @staticmethod
    def _check(mine: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str, fixed: set[str]) -> None:
        missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
        if missing or unexpected:
            parts = ([f"{len(missing)} missing key(s) (first: {missing[0]})"] if missing else []) + \
                    ([f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})"] if unexpected else [])
            raise CheckpointError(f"{source} does not match this network: {'; '.join(parts)}; resume with the same "
                                  "base model, network_dim, network_args and text-encoder settings as the run that "
                                  "wrote it")
        for key, value in mine.items():
            got = sd[key]
            if tuple(got.shape) != tuple(value.shape):
                raise CheckpointError(f"{source}: {key} has shape {list(got.shape)} but this network expects "
                                      f"{list(value.shape)}; resume with the network_dim and network_args of the "
                                      "run that wrote it")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise CheckpointError(f"{source}: {key} contains NaN or Inf values; resume from an earlier file")
            if key in fixed and not torch.allclose(got.to("cpu", torch.float64), value.to("cpu", torch.float64),
                                                        rtol=1e-6, atol=1e-8):
                raise CheckpointError(f"{source}: {key} is {got.flatten()[:1].tolist()} but this network has "
                                      f"{value.flatten()[:1].tolist()}; resume with the network_alpha and "
                                      "network_args of the run that wrote it")

    def _as_parameters(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The saved tensors under the network's parameter names: LyCORIS's DyLoRA saves one
        ``lora_up``/``lora_down`` but trains (and loads) per-block ``up_list.N``/``down_list.N``."""
        from lycoris.modules.dylora import DyLoraModule

        device = next(iter(self.net.state_dict().values())).device
        out = {k: v.to(device) for k, v in sd.items()}
        for m in self.net.unet_loras + self.net.text_encoder_loras:
            up, down = out.pop(f"{m.lora_name}.lora_up.weight", None), out.pop(f"{m.lora_name}.lora_down.weight", None)
            if not isinstance(m, DyLoraModule):
                if up is not None:
                    out[f"{m.lora_name}.lora_up.weight"] = up
                if down is not None:
                    out[f"{m.lora_name}.lora_down.weight"] = down
                continue
            b = m.block_size
            for i in range(m.block_count):
                if up is not None:
                    out[f"{m.lora_name}.up_list.{i}"] = up.reshape(up.shape[0], -1)[:, i * b:(i + 1) * b]
                if down is not None:
                    out[f"{m.lora_name}.down_list.{i}"] = down.reshape(m.lora_dim, -1)[i * b:(i + 1) * b]
        return out

    def load_weights_file(self, path: str) -> str:
        """kohya's ``--network_weights`` for LyCORIS (``network.load_weights``: non-strict); the info line."""
        from pathlib import Path

        from engine.checkpoint import read_lora_file

        try:
            tensors, _ = read_lora_file(Path(path).expanduser())
        except CheckpointError as err:
            raise ConfigError(f"--network_weights: {err}") from None
        mine = self.net.state_dict()
        for key, value in tensors.items():
            if key in mine and tuple(value.shape) != tuple(mine[key].shape):
                raise ConfigError(f"--network_weights: {path}: {key} has shape {list(value.shape)} but this network "
                                  f"expects {list(mine[key].shape)}; use the network_dim and {FLAG} of the run "
                                  "that wrote it")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ConfigError(f"--network_weights: {path}: {key} has NaN or Inf values")
        if not set(tensors) & set(mine):
            raise ConfigError(f"--network_weights: {path} has no weights for this network's modules "
                              f"(not an SD1.x {MODULE} file with this algo?)")
        with torch.no_grad():
            info = self.net.load_state_dict(self._as_parameters({k: v for k, v in tensors.items() if k in mine}),
                                            strict=False)
        line = f"load network weights from {path}: {len(set(tensors) & set(mine))} of {len(mine)} tensors"
        if info.missing_keys:
            line += f"; {len(info.missing_keys)} not in the file keep their fresh initialisation"
        if extra := len(set(tensors) - set(mine)):
            line += f"; {extra} key(s) of the file are not in this network and were left out"
        return line

    # ------------------------------------------------------------------ train
    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """LyCORIS's ``prepare_optimizer_params`` (groups at LR 0 left out, LoRA+ ``… plus`` groups), named
        as the engine names its groups; parameters in no group stop taking gradients."""
        with _quiet():
            groups, names = self.net.prepare_optimizer_params(text_encoder_lr, unet_lr, None)
        out = []
        for group, name in zip(groups, names):
            out.append(dict(group, params=list(group["params"]), name=_GROUP_NAMES.get(name, name)))
        trained = {id(p) for g in out for p in g["params"]}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in trained)
        return out

    def apply_max_norm(self, max_norm: float, device) -> tuple[int, float, float]:
        """kohya's ``--scale_weight_norms``: LyCORIS's ``apply_max_norm_regularization`` ->
        (keys scaled, mean norm, max norm)."""
        scaled, mean, top = self.net.apply_max_norm_regularization(max_norm, device)
        return int(scaled), float(mean), float(top)


def _follow_mode(model: nn.Module, loras: list[nn.Module]) -> Any:
    def sync(module, _args):
        if loras and loras[0].training != module.training:
            for lora in loras:
                lora.train(module.training)

    return model.register_forward_pre_hook(sync)


def _check_preset_file(kwargs: dict) -> None:
    preset = kwargs.get("preset")
    if preset and str(preset).endswith(".toml"):
        from lycoris.utils.preset import read_preset

        with contextlib.redirect_stdout(None):
            if read_preset(preset) is None:
                raise ConfigError(f"{FLAG}: preset={preset!r} is not a valid LyCORIS preset file")


def apply_lycoris(unet: nn.Module, text_encoder: nn.Module | None, *, dim: int, alpha: float, network_args,
                  dropout: float | None = None, train_unet: bool = True, unet_frozen: bool = False,
                  train_text_encoder: bool = True, text_encoder_frozen: bool = False) -> LycorisNet:
    """Build and apply ``lycoris.kohya``'s network as kohya does; every base weight stays frozen.

    ``train_unet`` / ``train_text_encoder``: kohya's ``apply_to`` flags (not --network_train_text_encoder_only /
    not --network_train_unet_only): a part left out gets no modules. ``unet_frozen`` / ``text_encoder_frozen``
    (LR 0): its modules exist and are saved but do not train.
    """
    kwargs = lycoris_kwargs(network_args, dropout)
    _check_preset_file(kwargs)
    for model in (unet, text_encoder):
        if model is not None:
            model.requires_grad_(False)
    te = _kohya_text_encoder(text_encoder)
    printed = io.StringIO()   # LyCORIS prints some warnings (LoHa/LoKr: no plain dropout): they go to the log
    with _sd1_presets() as kohya, contextlib.redirect_stdout(printed):
        try:
            net = kohya.create_network(1.0, dim, alpha, None, te, unet, neuron_dropout=dropout, **kwargs)
        except (ValueError, TypeError, AssertionError, KeyError) as err:
            raise ConfigError(f"{FLAG}: LyCORIS could not build {kwargs.get('algo', 'lora')} over this model: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        net.apply_to(te, unet, apply_text_encoder=bool(train_text_encoder and te is not None),
                     apply_unet=bool(train_unet))
    if not net.unet_loras and not net.text_encoder_loras:
        raise ConfigError(f"{FLAG}: LyCORIS made no module for this model (preset={kwargs.get('preset', 'full')}); "
                          "the base model is not SD1.x-shaped or the preset targets none of its layers")
    wrapper = LycorisNet(dim=dim, alpha=float(alpha), net=net, kwargs=kwargs,
                         text_encoder_frozen=bool(text_encoder_frozen), notes=lycoris_notes(network_args))
    wrapper.notes += [f"LyCORIS: {line.strip()}" for line in dict.fromkeys(printed.getvalue().splitlines()) if line.strip()]
    for lora in net.unet_loras:
        lora.train(unet.training)
        wrapper.unet_params += [p for p in lora.parameters()]
    for lora in net.text_encoder_loras:
        lora.train(text_encoder.training)
        wrapper.text_encoder_params += [p for p in lora.parameters()]
    for p in wrapper.unet_params:
        p.requires_grad_(not unet_frozen)
    for p in wrapper.text_encoder_params:
        p.requires_grad_(not text_encoder_frozen)
    wrapper.hooks.append(_follow_mode(unet, net.unet_loras))
    if text_encoder is not None:
        wrapper.hooks.append(_follow_mode(text_encoder, net.text_encoder_loras))
    return wrapper
