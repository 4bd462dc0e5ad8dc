"""What spyke-cockpit does with each kohya ``train_network.py`` flag that is not a config field.

One table, :data:`TABLE`: flag -> :class:`KohyaFlag` (its kohya type, the form group it belongs
to, and the decision). The rule: only a flag that cannot change the trained weights is accepted
with one info line; a flag that changes training is never a silent no-op: it is a config field
(implemented) or refused in one line naming it. A value equal to kohya's default (or an "off"
switch) changes nothing in kohya either, so it is accepted without a word: the GUI writes
``loss_type = "l2"`` and ``xformers = false`` into every config.

Flags that are config fields (:data:`engine.config.FIELDS`) are not in this table: a field wins.
This module is light: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine.errors import ConfigError

INFO = "info"            # accepted; cannot change the weights; one info line when switched on
REFUSED = "refused"      # spyke-cockpit will not do it; one line when switched on
ALIAS = "alias"          # kohya's other spelling of a field

# Help-only sections for flags outside the form's groups.
EXTRA_GROUPS = {"logging": "Logging & console", "other": "Other kohya flags"}


@dataclass(frozen=True)
class KohyaFlag:
    name: str
    kind: type               # bool (store_true), int, float, str, list (nargs="*")
    group: str               # a key of engine.config.GROUPS or EXTRA_GROUPS
    status: str
    line: str = ""           # the info line, or why it is refused
    default: Any = None      # kohya's default: the same value is accepted silently
    target: str = ""         # ALIAS: the field it sets
    decide: Callable[[Any, Mapping[str, Any]], str | None] | None = None  # custom: info line or raise


_UNCOMPILED = ("spyke-cockpit runs the model uncompiled: torch.compile changes how fast the same math runs, "
               "not the trained weights")


def _dynamo(value: Any, given: Mapping[str, Any]) -> str | None:
    if str(value).lower() == "no":
        return "--dynamo_backend=no: accepted; the model runs without torch.compile, as in kohya"
    if given.get("torch_compile"):
        return (f"--dynamo_backend={value}: accepted; kohya compiles with it under --torch_compile, but "
                f"{_UNCOMPILED}")
    return (f"--dynamo_backend={value}: accepted; kohya uses it only with --torch_compile, which is not given, "
            "so nothing is compiled")


_KERNEL = "the start-up line 'attention: SDPA …, kernel …' names the kernel PyTorch picks on this device"
_SDPA = f"PyTorch's fused attention (SDPA) runs instead, the same attention math; {_KERNEL}"

_ROWS: list[KohyaFlag] = [
    # --- model
    KohyaFlag("v2", bool, "model", REFUSED, "SD2.x base models are not supported; spyke-cockpit trains SD1.x"),
    KohyaFlag("tokenizer_cache_dir", str, "model", INFO,
              "the tokenizer ships with the base model (or spyke-cockpit's SD1.5 config); no download, no cache"),
    KohyaFlag("xformers", bool, "precision", INFO, f"xformers is not used; {_SDPA}", False),
    KohyaFlag("sdpa", bool, "precision", INFO, f"PyTorch's fused attention (SDPA) runs, as asked; {_KERNEL}", False),
    KohyaFlag("mem_eff_attn", bool, "precision", INFO, f"kohya's memory-efficient attention is not used; {_SDPA}",
              False),
    KohyaFlag("lowram", bool, "precision", INFO, "the base model is loaded the same way either way", False),
    KohyaFlag("highvram", bool, "precision", INFO, "memory is managed the same way either way", False),
    KohyaFlag("vae_batch_size", int, "precision", INFO,
              "latents are cached one image at a time; the batch size of caching does not change the weights", 1),
    KohyaFlag("dynamo_backend", str, "precision", INFO, default=None, decide=_dynamo),
    KohyaFlag("torch_compile", bool, "precision", INFO, _UNCOMPILED, False),
    KohyaFlag("cpu_offload_checkpointing", bool, "precision", INFO,
              "activations are not offloaded to the CPU; only memory use differs", False),
    KohyaFlag("ddp_timeout", int, "other", INFO, "single-device training; no distributed process group"),
    KohyaFlag("ddp_gradient_as_bucket_view", bool, "other", INFO, "single-device training; no DDP", False),
    KohyaFlag("ddp_static_graph", bool, "other", INFO, "single-device training; no DDP", False),
    KohyaFlag("deepspeed", bool, "other", REFUSED, "DeepSpeed is not supported (single-device training)", False),
    KohyaFlag("zero_stage", int, "other", INFO, "DeepSpeed is not used", 2),
    KohyaFlag("offload_optimizer_device", str, "other", REFUSED, "DeepSpeed offloading is not supported"),
    KohyaFlag("offload_optimizer_nvme_path", str, "other", REFUSED, "DeepSpeed offloading is not supported"),
    KohyaFlag("offload_param_device", str, "other", REFUSED, "DeepSpeed offloading is not supported"),
    KohyaFlag("offload_param_nvme_path", str, "other", REFUSED, "DeepSpeed offloading is not supported"),
    KohyaFlag("zero3_init_flag", bool, "other", REFUSED, "DeepSpeed is not supported", False),
    KohyaFlag("zero3_save_16bit_model", bool, "other", REFUSED, "DeepSpeed is not supported", False),
    KohyaFlag("fp16_master_weights_and_gradients", bool, "other", REFUSED, "DeepSpeed is not supported", False),
    KohyaFlag("fused_backward_pass", bool, "optimizer", REFUSED,
              "the fused backward pass (Adafactor, SDXL) is not supported for SD1.x LoRA", False),
    # --- dataset
    KohyaFlag("caption_extention", str, "dataset", ALIAS, target="caption_extension"),
    KohyaFlag("cache_info", bool, "dataset", INFO, "image sizes are read again each run; only start-up time differs",
              False),
    KohyaFlag("skip_cache_check", bool, "dataset", INFO, "latents are cached in memory, nothing to check", False),
    KohyaFlag("debug_dataset", bool, "dataset", REFUSED,
              "kohya's dataset viewer is not available; the cockpit's run plan lists the images", False),
    KohyaFlag("dataset_class", str, "dataset", REFUSED, "a custom dataset class is not supported"),
    KohyaFlag("conditioning_data_dir", str, "dataset", INFO,
              "kohya's train_network.py reads conditioning_data_dir only from dataset-TOML subsets (with "
              "--masked_loss); the flag itself changes nothing"),
    # --- other: console
    KohyaFlag("console_log_level", str, "logging", INFO, "progress lines go to the console and the run folder"),
    KohyaFlag("console_log_file", str, "logging", INFO,
              "the console is written to the run folder (.spyke/…/console.log), not to this file"),
    KohyaFlag("console_log_simple", bool, "logging", INFO, "progress lines are always plain", False),
    KohyaFlag("huggingface_repo_id", str, "saving", REFUSED, "uploading to the Hugging Face Hub is not supported"),
    KohyaFlag("huggingface_repo_type", str, "saving", INFO, "nothing is uploaded"),
    KohyaFlag("huggingface_path_in_repo", str, "saving", INFO, "nothing is uploaded"),
    KohyaFlag("huggingface_token", str, "saving", INFO, "nothing is uploaded"),
    KohyaFlag("huggingface_repo_visibility", str, "saving", INFO, "nothing is uploaded"),
    KohyaFlag("save_state_to_huggingface", bool, "saving", REFUSED, "uploading to the Hugging Face Hub is not "
              "supported", False),
    KohyaFlag("resume_from_huggingface", bool, "saving", REFUSED, "resuming from the Hugging Face Hub is not "
              "supported; download the state folder and pass --resume=<folder>", False),
    KohyaFlag("async_upload", bool, "saving", INFO, "nothing is uploaded", False),
]

# Keys the kohya_ss GUI writes into its --config_file that are not train_network.py flags:
# sd-scripts ignores them, and says nothing.
_GUI_ONLY = {
    "epoch": "the GUI's epoch box; sd-scripts ignores it (max_train_epochs / max_train_steps decide the length)",
    "noise_offset_type": "the GUI's noise-offset choice; sd-scripts ignores it (noise_offset / "
                         "multires_noise_iterations decide)",
}
GUI_ONLY = tuple(_GUI_ONLY)   # config-file keys only: hidden from --help, refused on the command line
_GUI_ONLY_FIX = {"epoch": "use --max_train_epochs=N for the run's length",
                 "noise_offset_type": "use --noise_offset=X or --multires_noise_iterations=N"}
for _name, _why in _GUI_ONLY.items():
    _ROWS.append(KohyaFlag(_name, str, "other", INFO, _why, decide=lambda v, g, _w=_why, _n=_name: f"{_n}: {_w}"))

TABLE: dict[str, KohyaFlag] = {row.name: row for row in _ROWS}
# The launcher's own flags, read by import-kohya (accelerate launch …): they never reach train_network.py.
CONFIG_FILE_FLAGS = ("config_file", "output_config")


def _is_off(flag: KohyaFlag, value: Any) -> bool:
    """The value changes nothing in kohya: a switch left off, an empty value, or kohya's default."""
    if value is None or value is False or value == "" or value == []:
        return True
    return flag.default is not None and value == flag.default


def decide(name: str, value: Any, given: Mapping[str, Any], where: str) -> tuple[str | None, dict[str, Any]]:
    """What ``name=value`` (already typed) does: (an info line or None, config fields it sets).

    Raises a one-line ConfigError naming the flag when spyke-cockpit cannot honour it.
    """
    flag = TABLE[name]
    if name in _GUI_ONLY and where == f"--{name}":
        raise ConfigError(f"--{name}: not a train_network.py flag (kohya refuses it on the command line); "
                          f"{_GUI_ONLY_FIX[name]}")
    if flag.status == ALIAS:
        note = flag.decide(value, given) if flag.decide else None
        return note, ({flag.target: value} if not _is_off(flag, value) or flag.kind is not bool else {})
    if flag.decide is not None:
        try:
            return flag.decide(value, given), {}
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}" if where != f"--{name}" else str(err)) from None
    if _is_off(flag, value):
        return None, {}
    shown = f"--{name}" + ("" if flag.kind is bool else f"={value!r}" if not isinstance(value, list) else "")
    if flag.status == INFO:
        return f"{shown}: accepted; {flag.line}", {}
    prefix = "" if where == f"--{name}" else f"{where}: "
    raise ConfigError(f"{prefix}{shown}: {flag.line}; remove it")   # REFUSED
