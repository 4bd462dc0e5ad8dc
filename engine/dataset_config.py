"""Dataset configuration: kohya's dataset TOML and ``--train_data_dir`` folders → specs.

Value fallback (kohya ``config_util``): subset → dataset → ``[general]`` → CLI
(``DatasetArgs``). Option scopes follow kohya's schema:

* subset-or-above: ``num_repeats``, ``caption_extension``, ``class_tokens``,
  ``shuffle_caption``, ``keep_tokens``, ``flip_aug``, and the caption/augmentation keys
  (``caption_prefix``/``caption_suffix``, ``caption_dropout_rate``,
  ``caption_dropout_every_n_epochs``, ``caption_tag_dropout_rate``, ``caption_separator``,
  ``keep_tokens_separator``, ``secondary_separator``, ``enable_wildcard``,
  ``token_warmup_min``/``token_warmup_step``, ``color_aug``, ``random_crop``,
  ``face_crop_aug_range``, ``resize_interpolation``)
* subset only: ``image_dir`` (required unless ``metadata_file``), ``is_reg``,
  ``metadata_file`` (a fine-tuning subset: captions from kohya's JSON/JSONL metadata;
  every subset of that dataset must have one, as in kohya), ``alpha_mask`` (default
  ``--alpha_mask``), ``conditioning_data_dir`` (kohya's ControlNet-style subsets, with
  ``--masked_loss``; rules in ``engine.mask_config``)
* dataset-or-general only: ``resolution`` (int or ``[w, h]``), ``batch_size``,
  ``enable_bucket``, ``min_bucket_reso``, ``max_bucket_reso``, ``bucket_reso_steps``,
  ``bucket_no_upscale``, ``validation_split``, ``validation_seed`` (the held-out images of
  each subset; see ``engine.dataset_split``); ``resize_interpolation`` is read at both levels, as
  kohya reads it (a subset's own, else its dataset's, ``[general]``'s, the flag's)

Other kohya options are accepted only when they hold kohya's default (so they change
nothing); any other value, and any unknown key, is a ``DatasetError``.

A relative ``image_dir`` is resolved against the TOML file's folder first; if no such
folder exists there it is resolved against the current working directory (kohya's
rule); if neither exists the error names both paths.

Its length is kohya's dataset-TOML schema: each key's scope, type, fallback and check in one place
(the folder and ``--in_json`` sources are ``engine.dataset_sources``, masks ``engine.mask_config``).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine.errors import DatasetError
from engine.mask_config import check_conditioning_dataset, check_conditioning_subset, subset_mask_options

# kohya's --train_data_dir subfolder convention: "<repeats>_<class tokens>"
FOLDER_RE = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class CaptionOptions:
    """kohya's caption and augmentation options (subset-or-above keys, kohya's names and defaults): a
    subset's values, and the command line's fallbacks for them."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: str | tuple[float, float] | None = None   # "lo,hi" on the command line
    resize_interpolation: str | None = None   # engine.resize; None: kohya's default (area down, lanczos up)


CAPTION_KEYS = tuple(f.name for f in fields(CaptionOptions))
_CONVERTED = ("caption_dropout_rate", "caption_tag_dropout_rate", "keep_tokens_separator")  # typed below
CAPTION_KEYS_AS_IS = tuple(k for k in CAPTION_KEYS if k not in _CONVERTED)


@dataclass(frozen=True)
class DatasetArgs(CaptionOptions):
    """CLI-level fallbacks, with kohya flag names."""

    dataset_config: Path | None = None
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None      # kohya's fine-tuning metadata for --train_data_dir (a metadata_file subset)
    dataset_repeats: int = 1         # kohya: num_repeats of a subset that sets none
    alpha_mask: bool = False         # kohya: a subset's default alpha_mask
    masked_loss: bool = False        # kohya: conditioning_data_dir subsets are accepted only with it
    resolution: tuple[int, int] = (512, 512)   # (width, height)
    train_batch_size: int = 1
    caption_extension: str = ".caption"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    seed: int | None = None          # the run's --seed: the split's seed when validation_seed is not set


@dataclass(frozen=True)
class SubsetSpec(CaptionOptions):
    image_dir: Path
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    shuffle_caption: bool
    keep_tokens: int
    is_reg: bool
    flip_aug: bool
    where: str  # where it was declared, for messages ("ds.toml: datasets[0].subsets[1]")
    metadata_file: Path | None = None   # a fine-tuning subset (kohya FineTuningSubset)
    alpha_mask: bool = False            # the image's transparency is its loss mask
    conditioning_data_dir: Path | None = None   # mask images (red channel), kohya's ControlNet-style subset


@dataclass(frozen=True)
class DatasetSpec:
    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: tuple[SubsetSpec, ...]
    where: str
    validation_split: float = 0.0
    validation_seed: int = 0          # resolved: validation_seed, else the run's seed, else 0
    resize_interpolation: str | None = None   # the dataset's own (kohya: dataset → general → flag); subsets pick theirs


SUBSET_ASCENDABLE = {
    "num_repeats": "int",
    "caption_extension": "str",
    "class_tokens": "str",
    "shuffle_caption": "bool",
    "keep_tokens": "int",
    "flip_aug": "bool",
    "caption_prefix": "str",
    "caption_suffix": "str",
    "caption_dropout_rate": "float",
    "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float",
    "caption_separator": "str",
    "keep_tokens_separator": "str",
    "secondary_separator": "str",
    "enable_wildcard": "bool",
    "token_warmup_min": "int",
    "token_warmup_step": "float",
    "color_aug": "bool",
    "random_crop": "bool",
    "face_crop_aug_range": "range2",
    "resize_interpolation": "interpolation",
}
# kohya's DreamBooth-only subset keys: not allowed beside metadata_file
DREAMBOOTH_ONLY = ("caption_extension", "class_tokens", "is_reg")
SUBSET_ONLY = {"image_dir": "str", "is_reg": "bool", "metadata_file": "str", "alpha_mask": "bool",
               "conditioning_data_dir": "str"}
DATASET_ASCENDABLE = {
    "resolution": "resolution",
    "batch_size": "int",
    "enable_bucket": "bool",
    "min_bucket_reso": "int",
    "max_bucket_reso": "int",
    "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool",
    "validation_split": "float",
    "validation_seed": "int",
    "resize_interpolation": "interpolation",
}
# CLI flag for each option (kohya names); options without a flag have a fixed default.
CLI_FLAG = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
NO_CLI_DEFAULT = {"class_tokens": None, "is_reg": False, "metadata_file": None}

_ANY = object()      # any value is harmless (ignored)
_ABSENT = object()   # kohya default is "not set": any value changes behaviour
# kohya options this engine does not implement: scope -> {key: harmless value}
UNSUPPORTED = {
    "subset": {"cache_info": _ANY, "custom_attributes": {}},
    "subset_only": {},
    "dataset": {"network_multiplier": 1.0},
}
_ALL_KNOWN = (
    set(SUBSET_ASCENDABLE) | set(SUBSET_ONLY) | set(DATASET_ASCENDABLE)
    | {k for table in UNSUPPORTED.values() for k in table}
)


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _check_type(kind: str, value: Any, where: str, key: str) -> Any:
    """Validate a TOML/CLI value; returns it normalised (resolution -> (w, h))."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{where}: {key} = {value!r} is {_tname(value)}; it must be an integer, e.g. {key} = 10")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise DatasetError(f"{where}: {key} = {value!r} is {_tname(value)}; it must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise DatasetError(f"{where}: {key} = {value!r} is {_tname(value)}; it must be a quoted string")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetError(f"{where}: {key} = {value!r} is {_tname(value)}; it must be a number, e.g. {key} = 0.1")
        return value
    if kind == "interpolation":   # kohya's resize_interpolation (a TOML also takes "box"); "" = not set
        from engine.resize import TOML_CHOICES

        if value == "":
            return None
        if not isinstance(value, str) or value not in TOML_CHOICES:
            raise DatasetError(f"{where}: {key} = {value!r} is not a resize interpolation; use one of "
                               f"{', '.join(TOML_CHOICES)} (or leave it out for kohya's default: area when "
                               f"shrinking, lanczos when enlarging)")
        return value
    if kind == "range2":   # kohya face_crop_aug_range: [lo, hi] in TOML, "lo,hi" on the CLI
        if isinstance(value, str):
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                value = None
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not ok or not 0 < value[0] <= value[1]:
            raise DatasetError(f"{where}: {key} = {value!r} must be two positive numbers low <= high, "
                               f"e.g. {key} = [2.0, 4.0] (--{key}=2.0,4.0)")
        return (float(value[0]), float(value[1]))
    if kind == "resolution":
        if isinstance(value, str):  # CLI style "512" or "512,768"
            try:
                value = [int(v) for v in value.split(",")]
            except ValueError:
                raise DatasetError(f"{where}: {key} = {value!r} must be an integer or width,height, e.g. 512 or 512,768") from None
            if len(value) == 1:
                value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise DatasetError(f"{where}: {key} = {value!r} must be an integer or [width, height], e.g. {key} = 512 or [512, 768]")
        if value[0] <= 0 or value[1] <= 0:
            raise DatasetError(f"{where}: {key} = {list(value)} must be positive, e.g. {key} = 512")
        return (int(value[0]), int(value[1]))
    raise AssertionError(kind)


def _is_harmless(value: Any, harmless: Any) -> bool:
    if harmless is _ANY:
        return True
    if harmless is _ABSENT:
        return False
    if isinstance(harmless, bool):
        return value is harmless
    if isinstance(harmless, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == harmless
    return type(value) is type(harmless) and value == harmless


def _check_keys(table: dict, allowed: set[str], scope: str, where: str) -> None:
    """Reject unknown keys, keys in the wrong section and unsupported kohya options."""
    unsupported = dict(UNSUPPORTED["subset"])
    if scope == "subset":
        unsupported |= UNSUPPORTED["subset_only"]
    if scope in ("dataset", "general"):
        unsupported |= UNSUPPORTED["dataset"]
    for key, value in table.items():
        if key in allowed:
            continue
        if key in unsupported:
            harmless = unsupported[key]
            if _is_harmless(value, harmless):
                continue
            fix = "remove it" if harmless is _ABSENT or harmless is _ANY else f"remove it or set it to {harmless!r}"
            raise DatasetError(f"{where}: kohya option {key} = {value!r} is not supported by spyke-cockpit; {fix}")
        if key in _ALL_KNOWN:
            if key in SUBSET_ONLY or key in UNSUPPORTED["subset_only"]:
                raise DatasetError(f"{where}: {key} is a subset option; move it into a [[datasets.subsets]] table")
            raise DatasetError(f"{where}: {key} is a dataset option; move it to its [[datasets]] table or to [general]")
        close = difflib.get_close_matches(key, sorted(_ALL_KNOWN), n=1)
        hint = f"; did you mean {close[0]}?" if close else "; remove it"
        raise DatasetError(f"{where}: unknown key {key!r}{hint}")


def _as_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    return Path(value).expanduser()


def _cli_value(args: DatasetArgs, key: str) -> tuple[Any, str]:
    if key in NO_CLI_DEFAULT:
        return NO_CLI_DEFAULT[key], f"default {key}"
    flag = CLI_FLAG.get(key, key)
    return getattr(args, flag), f"--{flag}"


def _pick(key: str, kind: str, layers: list[tuple[dict, str]], args: DatasetArgs) -> tuple[Any, str]:
    """First layer that sets ``key`` wins, else the CLI. Returns (value, where)."""
    for table, where in layers:
        if key in table:
            return _check_type(kind, table[key], where, key), f"{where}: {key}"
    value, where = _cli_value(args, key)
    if value is None:
        return None, where
    return _check_type(kind, value, where, key), where


def _make_dataset(ds_layers: list[tuple[dict, str]], args: DatasetArgs, subsets: list[SubsetSpec],
                  where: str, warnings: list[str]) -> DatasetSpec:
    vals: dict[str, Any] = {}
    srcs: dict[str, str] = {}
    for key, kind in DATASET_ASCENDABLE.items():
        vals[key], srcs[key] = _pick(key, kind, ds_layers, args)
    for key in ("batch_size", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"):
        if vals[key] < 1:
            raise DatasetError(f"{srcs[key]} = {vals[key]} must be at least 1")
    if not 0 <= vals["validation_split"] < 1:
        raise DatasetError(f"{srcs['validation_split']} = {vals['validation_split']} must be from 0 up to (not "
                           f"including) 1: the fraction of each subset held out, e.g. 0.1")
    if vals["validation_seed"] is not None and vals["validation_seed"] < 0:
        raise DatasetError(f"{srcs['validation_seed']} = {vals['validation_seed']} must be 0 or more")
    split_seed = vals["validation_seed"] if vals["validation_seed"] is not None else (args.seed or 0)
    steps = vals["bucket_reso_steps"]
    res = vals["resolution"]
    if vals["enable_bucket"] and steps % 64:
        warnings.append(f"{srcs['bucket_reso_steps']} = {steps} is not a multiple of 64: kohya sd-scripts 0.8 trains "
                        f"it as spyke-cockpit does, 0.9 and later refuse it")
    if vals["enable_bucket"]:
        lo, hi = vals["min_bucket_reso"], vals["max_bucket_reso"]
        if lo % steps:
            lo -= lo % steps
            warnings.append(f"{srcs['min_bucket_reso']} rounded down to {lo} (a multiple of bucket_reso_steps {steps})")
        if hi % steps:
            hi += steps - hi % steps
            warnings.append(f"{srcs['max_bucket_reso']} rounded up to {hi} (a multiple of bucket_reso_steps {steps})")
        if lo < steps:
            lo = steps
        if min(res) < lo and not vals["bucket_no_upscale"]:
            raise DatasetError(f"{srcs['min_bucket_reso']} = {lo} is larger than resolution {res[0]}x{res[1]}; set min_bucket_reso <= {min(res)}")
        if max(res) > hi and not vals["bucket_no_upscale"]:
            raise DatasetError(f"{srcs['max_bucket_reso']} = {hi} is smaller than resolution {res[0]}x{res[1]}; set max_bucket_reso >= {max(res)}")
        vals["min_bucket_reso"], vals["max_bucket_reso"] = lo, hi
        if res[0] % steps or res[1] % steps:
            warnings.append(f"{srcs['resolution']} {res[0]}x{res[1]} is not a multiple of bucket_reso_steps {steps}")
    return DatasetSpec(
        resolution=res, batch_size=vals["batch_size"], enable_bucket=vals["enable_bucket"],
        min_bucket_reso=vals["min_bucket_reso"], max_bucket_reso=vals["max_bucket_reso"],
        bucket_reso_steps=steps, bucket_no_upscale=vals["bucket_no_upscale"],
        subsets=tuple(subsets), where=where,
        validation_split=float(vals["validation_split"]), validation_seed=int(split_seed),
        resize_interpolation=vals["resize_interpolation"],
    )


def _make_subset(sub_layers: list[tuple[dict, str]], args: DatasetArgs, image_dir: Path, is_reg: bool, where: str,
                 metadata_file: Path | None = None, masks: tuple[bool, Path | None] | None = None) -> SubsetSpec:
    vals: dict[str, Any] = {}
    srcs: dict[str, str] = {}
    for key, kind in SUBSET_ASCENDABLE.items():
        vals[key], srcs[key] = _pick(key, kind, sub_layers, args)
    for key in ("num_repeats", "token_warmup_min"):
        if vals[key] < (1 if key == "num_repeats" else 0):
            raise DatasetError(f"{srcs[key]} = {vals[key]} must be at least {1 if key == 'num_repeats' else 0}")
    for key in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_step"):
        if vals[key] < 0:
            raise DatasetError(f"{srcs[key]} = {vals[key]} must be 0 or more")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= vals[key] <= 1:
            raise DatasetError(f"{srcs[key]} = {vals[key]} must be a probability from 0 to 1, e.g. 0.05")
    if not vals["caption_separator"]:
        raise DatasetError(f"{srcs['caption_separator']} is empty; use the character between tags, e.g. \",\"")
    class_tokens = vals["class_tokens"]
    if class_tokens is not None and not class_tokens.strip():
        class_tokens = None
    alpha_mask, conditioning_dir = masks if masks is not None else (args.alpha_mask, None)
    if conditioning_dir is not None:
        check_conditioning_subset(vals["random_crop"], where)
        class_tokens = None      # kohya's ControlNet-style subsets have no class tokens
    for key in ("caption_prefix", "caption_suffix", "secondary_separator"):
        if vals[key] == "":
            vals[key] = None
    return SubsetSpec(
        image_dir=image_dir, num_repeats=vals["num_repeats"], caption_extension=vals["caption_extension"],
        class_tokens=class_tokens, shuffle_caption=vals["shuffle_caption"], keep_tokens=vals["keep_tokens"],
        is_reg=is_reg, flip_aug=vals["flip_aug"], where=where,
        **{key: vals[key] for key in CAPTION_KEYS_AS_IS},
        caption_dropout_rate=float(vals["caption_dropout_rate"]),
        caption_tag_dropout_rate=float(vals["caption_tag_dropout_rate"]),
        keep_tokens_separator=vals["keep_tokens_separator"] or "",
        metadata_file=metadata_file, alpha_mask=bool(alpha_mask), conditioning_data_dir=conditioning_dir,
    )


def _resolve_existing(raw: str, toml_path: Path, where: str, key: str) -> Path:
    """A file path from the TOML: beside the TOML first, then the working directory (kohya's rule)."""
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [(toml_path.parent / p).absolute(), Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c
    looked = " and ".join(str(c) for c in candidates)
    raise DatasetError(f"{where}: {key} {raw!r} not found (looked in {looked}); fix the path")


def _resolve_image_dir(raw: str, toml_path: Path, where: str, key: str = "image_dir") -> Path:
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    beside = (toml_path.parent / p).absolute()
    if beside.exists():
        return beside
    in_cwd = Path.cwd() / p
    if in_cwd.exists():
        return in_cwd
    raise DatasetError(f"{where}: {key} {raw!r} not found (looked in {beside} and {in_cwd}); fix the path")


def parse_dataset_toml(path: Path, args: DatasetArgs, warnings: list[str]) -> list[DatasetSpec]:
    path = Path(path).expanduser()
    name = str(path)
    if not path.is_file():
        raise DatasetError(f"dataset config {name} not found; check --dataset_config")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise DatasetError(f"{name}: invalid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{name}: cannot read: {err}") from None
    for key in doc:
        if key not in ("general", "datasets"):
            close = difflib.get_close_matches(key, ["general", "datasets"], n=1)
            hint = f"did you mean [{close[0]}]?" if close else "only [general] and [[datasets]] are allowed"
            raise DatasetError(f"{name}: unknown key {key!r} at top level; {hint}")
    general = doc.get("general", {})
    if not isinstance(general, dict):
        raise DatasetError(f"{name}: general must be a table; write it as [general]")
    _check_keys(general, set(SUBSET_ASCENDABLE) | set(DATASET_ASCENDABLE), "general", f"{name}: general")
    datasets = doc.get("datasets")
    if datasets is None or datasets == []:
        raise DatasetError(f"{name}: no [[datasets]] table; add one with at least one [[datasets.subsets]] image_dir")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise DatasetError(f"{name}: datasets must be an array of tables; write each as [[datasets]]")
    gen_layer = (general, f"{name}: general")
    specs: list[DatasetSpec] = []
    for di, ds in enumerate(datasets):
        ds_where = f"{name}: datasets[{di}]"
        raw_subsets = ds.get("subsets")
        ds_fields = {k: v for k, v in ds.items() if k != "subsets"}
        _check_keys(ds_fields, set(SUBSET_ASCENDABLE) | set(DATASET_ASCENDABLE), "dataset", ds_where)
        if not raw_subsets:
            raise DatasetError(f"{ds_where} has no [[datasets.subsets]]; add one with image_dir = \"...\"")
        if not isinstance(raw_subsets, list) or not all(isinstance(s, dict) for s in raw_subsets):
            raise DatasetError(f"{ds_where}: subsets must be an array of tables; write each as [[datasets.subsets]]")
        subsets = []
        fine_tuning = [("metadata_file" in sub) for sub in raw_subsets]
        if any(fine_tuning) and not all(fine_tuning):
            raise DatasetError(f"{ds_where}: subsets with metadata_file (fine tuning) and without it (image folders) "
                               f"cannot share a dataset (kohya); put them in separate [[datasets]]")
        conditioning = check_conditioning_dataset(raw_subsets, ds_where, args.masked_loss)
        for si, sub in enumerate(raw_subsets):
            s_where = f"{ds_where}.subsets[{si}]"
            _check_keys(sub, set(SUBSET_ASCENDABLE) | set(SUBSET_ONLY), "subset", s_where)
            masks = subset_mask_options(sub, s_where, args.alpha_mask, conditioning, lambda raw, w=s_where: (
                _resolve_image_dir(raw, path, w, "conditioning_data_dir")), _check_type)
            metadata_file = None
            if "metadata_file" in sub:
                for key in DREAMBOOTH_ONLY:
                    if key in sub:
                        raise DatasetError(f"{s_where}: {key} cannot be used with metadata_file (a fine-tuning "
                                           f"subset takes its captions from the metadata); remove it")
                raw_meta = _check_type("str", sub["metadata_file"], s_where, "metadata_file")
                metadata_file = _resolve_existing(raw_meta, path, s_where, "metadata_file")
                raw_dir = _check_type("str", sub.get("image_dir", ""), s_where, "image_dir")
                image_dir = _resolve_image_dir(raw_dir, path, s_where) if raw_dir else metadata_file.parent
            else:
                if "image_dir" not in sub:
                    raise DatasetError(f"{s_where}: image_dir is missing; add image_dir = \"path/to/images\"")
                raw_dir = _check_type("str", sub["image_dir"], s_where, "image_dir")
                image_dir = _resolve_image_dir(raw_dir, path, s_where)
            is_reg = _check_type("bool", sub.get("is_reg", False), s_where, "is_reg")
            layers = [(sub, s_where), (ds_fields, ds_where), gen_layer]
            subsets.append(_make_subset(layers, args, image_dir, is_reg, s_where, metadata_file, masks))
        specs.append(_make_dataset([(ds_fields, ds_where), gen_layer], args, subsets, ds_where, warnings))
    return specs
