"""Where a run's datasets come from: kohya's dataset TOML (``engine.dataset_config``), the
``--train_data_dir`` / ``--reg_data_dir`` folders with kohya's ``N_name`` subfolders, or kohya's
``--in_json`` fine-tuning metadata with ``--train_data_dir`` (one ``metadata_file`` subset, as
``train_network.py`` builds it).
"""

from __future__ import annotations

from pathlib import Path

from engine.dataset_config import (FOLDER_RE, DatasetArgs, DatasetSpec, SubsetSpec, _as_path, _make_dataset,
                                   _make_subset, parse_dataset_toml)
from engine.errors import DatasetError


def _folder_subsets(base: Path, flag: str, is_reg: bool, args: DatasetArgs, warnings: list[str]) -> list[SubsetSpec]:
    base = base.absolute()
    if not base.is_dir():
        raise DatasetError(f"--{flag} {base} is not a folder; point it at the folder holding N_name subfolders")
    out = []
    loose_images = False
    for child in sorted(base.iterdir()):
        if not child.is_dir():
            if child.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                loose_images = True
            continue
        if child.name.startswith("."):
            continue
        m = FOLDER_RE.match(child.name)
        if not m or int(m.group(1)) < 1:
            warnings.append(f"--{flag}: skipped folder {child.name!r}: its name must be <repeats>_<class tokens>, e.g. 10_spyke")
            continue
        repeats, tokens = int(m.group(1)), (m.group(2) or None)
        sub = _make_subset([], args, child, is_reg, f"--{flag} {child}")
        out.append(SubsetSpec(**{**sub.__dict__, "num_repeats": repeats, "class_tokens": tokens}))
    if loose_images:
        warnings.append(f"--{flag}: images directly inside {base} are ignored; kohya reads only N_name subfolders such as 10_spyke")
    if not out and not is_reg:
        raise DatasetError(f"--{flag} {base} has no <repeats>_<name> subfolders; put the images in a folder such as {base / '10_spyke'}")
    if not out:
        warnings.append(f"--{flag} {base} has no <repeats>_<name> subfolders; no regularisation images used")
    return out


def resolve_dataset_specs(args: DatasetArgs, warnings: list[str]) -> list[DatasetSpec]:
    """DatasetArgs (+ TOML) → list of DatasetSpec. Raises DatasetError."""
    config = _as_path(args.dataset_config)
    train_dir = _as_path(args.train_data_dir)
    reg_dir = _as_path(args.reg_data_dir)
    if config is not None:
        ignored = [f for f, v in (("train_data_dir", train_dir), ("reg_data_dir", reg_dir), ("in_json", args.in_json))
                   if v is not None]
        if ignored:
            warnings.append(f"--{' and --'.join(ignored)} ignored because --dataset_config is given (kohya behaviour)")
        return parse_dataset_toml(config, args, warnings)
    if train_dir is None:
        raise DatasetError("no dataset given; pass --dataset_config file.toml or --train_data_dir folder (with N_name subfolders)")
    in_json = _as_path(args.in_json)
    if in_json is not None:   # kohya: one fine-tuning subset {image_dir: train_data_dir, metadata_file: in_json}
        if reg_dir is not None:
            warnings.append("--reg_data_dir ignored because --in_json is given (a fine-tuning dataset, as in kohya)")
        where = f"--in_json {in_json}"
        if not in_json.is_file():
            raise DatasetError(f"{where} not found; point it at kohya's metadata .json/.jsonl")
        if not train_dir.is_dir():
            raise DatasetError(f"--train_data_dir {train_dir} is not a folder; with --in_json it holds the images")
        sub = _make_subset([], args, train_dir.absolute(), False, where, in_json.absolute())
        return [_make_dataset([], args, [sub], where, warnings)]
    subsets = _folder_subsets(train_dir, "train_data_dir", False, args, warnings)
    if reg_dir is not None:
        subsets += _folder_subsets(reg_dir, "reg_data_dir", True, args, warnings)
    return [_make_dataset([], args, subsets, f"--train_data_dir {train_dir}", warnings)]
