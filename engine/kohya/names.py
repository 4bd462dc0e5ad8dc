"""kohya's names for what a run writes: checkpoint files and training-state folders (no torch)."""

from __future__ import annotations

from engine.errors import ConfigError

SUPPORTED_SAVE_FORMATS = ("safetensors", "ckpt", "pt")
# kohya writes .ckpt/.pt LoRAs with torch.save: the state dict only, no metadata.
TORCH_SAVE_FORMATS = ("ckpt", "pt")
# kohya's names when --output_name is not given.
DEFAULT_STEP_NAME = "at"
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_LAST_NAME = "last"


def check_save_model_as(value: str) -> str:
    """Validate kohya's ``save_model_as`` for a LoRA: safetensors, ckpt or pt (kohya's choices besides
    the diffusers folder formats, which are for full models)."""
    ext = str(value).strip().lstrip(".").lower()
    if ext in SUPPORTED_SAVE_FORMATS:
        return ext
    raise ConfigError(f"save_model_as = {value!r} is not a LoRA file format; set save_model_as to safetensors, "
                      "ckpt or pt")


def checkpoint_filename(
    output_name: str | None,
    *,
    step: int | None = None,
    epoch: int | None = None,
    ext: str = "safetensors",
) -> str:
    """kohya's file names: ``{name}-step{step:08d}``, ``{name}-{epoch:06d}``, or ``{name}`` (final).

    With no ``output_name`` kohya uses ``at-step…``, ``epoch-…`` and ``last``.
    """
    ext = check_save_model_as(ext)
    if step is not None and epoch is not None:
        raise ValueError("checkpoint_filename: give step or epoch, not both")
    if output_name is not None:
        name = str(output_name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ConfigError(
                f"output_name = {output_name!r} must be a plain file name (no folders); put folders in output_dir"
            )
    if step is not None:
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        return f"{output_name or DEFAULT_STEP_NAME}-step{int(step):08d}.{ext}"
    if epoch is not None:
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        return f"{output_name or DEFAULT_EPOCH_NAME}-{int(epoch):06d}.{ext}"
    return f"{output_name or DEFAULT_LAST_NAME}.{ext}"


def state_dirname(output_name: str, step: int | None) -> str:
    return f"{output_name}-step{step:08d}-state" if step is not None else f"{output_name}-state"
