"""The dataset-TOML side of kohya's loss masks: a subset's ``alpha_mask`` and kohya's ControlNet-style
subsets (``conditioning_data_dir``), checked with kohya's ``config_util`` schema rules.

* ``alpha_mask``: a subset option only (``[general]``/``[[datasets]]`` refuse it, as kohya's schema
  does); a subset without it takes ``--alpha_mask``.
* ``conditioning_data_dir``: a subset option that makes the dataset kohya's ``ControlNetDataset``.
  kohya's ``train_network.py`` accepts such subsets only with ``--masked_loss``; every subset of
  that dataset must have one; it takes no ``metadata_file``, ``is_reg``, ``class_tokens`` or
  ``alpha_mask`` (kohya's schema has none of them) and refuses ``random_crop`` (kohya asserts).

No torch, no PIL: the pairing of images with their conditioning images is in ``engine.masks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from engine.errors import DatasetError

CONDITIONING = "conditioning_data_dir"
NOT_WITH_CONDITIONING = ("metadata_file", "is_reg", "class_tokens", "alpha_mask")


def check_conditioning_dataset(raw_subsets: list[dict], ds_where: str, masked_loss: bool) -> bool:
    """Whether the dataset is a conditioning (ControlNet-style) one; raises when its subsets break kohya's rules."""
    having = [CONDITIONING in sub for sub in raw_subsets]
    if not any(having):
        return False
    if not masked_loss:
        raise DatasetError(f"{ds_where}: {CONDITIONING} subsets (masks for the loss) need --masked_loss, as in "
                           f"kohya; add --masked_loss or remove {CONDITIONING}")
    if not all(having):
        raise DatasetError(f"{ds_where}: subsets with {CONDITIONING} and without it cannot share a dataset (kohya); "
                           f"put them in separate [[datasets]]")
    return True


def subset_mask_options(sub: dict[str, Any], s_where: str, cli_alpha_mask: bool, conditioning: bool,
                        resolve_dir: Callable[[str], Path], check_type: Callable[..., Any]
                        ) -> tuple[bool, Path | None]:
    """(alpha_mask, conditioning_data_dir) of one TOML subset."""
    if not conditioning:
        alpha = check_type("bool", sub["alpha_mask"], s_where, "alpha_mask") if "alpha_mask" in sub else cli_alpha_mask
        return bool(alpha), None
    for key in NOT_WITH_CONDITIONING:
        if key in sub:
            raise DatasetError(f"{s_where}: {key} cannot be used with {CONDITIONING} (kohya's ControlNet-style "
                               f"subset: the mask comes from the conditioning image); remove it")
    raw = check_type("str", sub[CONDITIONING], s_where, CONDITIONING)
    if not raw:
        raise DatasetError(f"{s_where}: {CONDITIONING} is empty; give the folder of the mask images")
    return False, resolve_dir(raw)


def check_conditioning_subset(random_crop: bool, s_where: str) -> None:
    if random_crop:
        raise DatasetError(f"{s_where}: random_crop cannot be used with {CONDITIONING} (kohya's ControlNet-style "
                           f"dataset refuses it); remove random_crop")
